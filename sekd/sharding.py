"""train.distributed=fsdp: the student and the teacher sharded over the ranks with FSDP2 (`fully_shard`).

Student: each decoder layer is one FSDP unit, and the root unit is the module whose forward is the
whole per-micro-batch loss (sekd.loop.StudentLoss: body, heads, selection, the loss sum). The root
must be that module, not the Hugging Face model: the chunked flow never calls the model's forward
(it runs the body, then the LM head at chosen positions), so hooks on the model would never unshard
the embeddings, norm and head, nor reduce-scatter their gradients. Gradients are *summed* over ranks
(divide factor 1): the loop divides the summed loss gradient once per optimizer step by the global
weight Σ s_i, as in one process.

Teacher: inference only. Each decoder layer and the decoder are FSDP units, resharded after every
forward (no gradients, so nothing to reduce). Its LM head stays a plain replicated module (an untied
copy when it was tied to the sharded input embedding): the selective teacher head runs it at the
selected positions, inside the student's loss, outside any teacher forward.

Checkpoints: the sharded weights and optimizer state go through torch.distributed.checkpoint (every
rank writes its own shard into one folder); the rest of checkpoint.pt is unchanged (sekd.loop).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDED_GLOB = "checkpoint-*.dcp"  # the sharded folders of a run; checkpoint.pt names the live one


def mesh(device: torch.device):
    """The 1-D mesh of every rank (the default process group): FSDP shards over all of them."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Qwen3, Llama, ...): the bulk of the weights."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"train.distributed=fsdp: {type(model).__name__} has no decoder .layers to shard")
    return list(layers)


def shard_student(root: nn.Module, model: nn.Module, device: torch.device) -> None:
    """FSDP2 units: each decoder layer of `model`, then `root` (the module whose forward is the loss and
    which holds `model`) for the rest. Reductions sum instead of averaging over ranks."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    m = mesh(device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=m)
    fully_shard(root, mesh=m)
    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)  # Σ over ranks; the loop divides once by Σ s_i
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def shard_teacher(teacher: nn.Module, device: torch.device) -> None:
    """The frozen teacher sharded for inference: its decoder layers and its decoder (embeddings, norm),
    resharded after each forward; the LM head stays replicated (untied from the embedding first)."""
    from torch.distributed.fsdp import fully_shard

    untie_head(teacher)
    m = mesh(device)
    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=m, reshard_after_forward=True)
    fully_shard(teacher.get_decoder(), mesh=m, reshard_after_forward=True)


def untie_head(model: nn.Module) -> None:
    """A head tied to the input embedding gets its own copy of the weights, so sharding the embedding
    leaves the head whole on every rank."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (e.g. clip_grad_norm_'s total norm over sharded gradients); a plain
    tensor as it is. Every rank must call it for a DTensor (it gathers)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (empty on the other ranks); every rank must call it.
    A tied weight is kept under its first name only (the gathered copies no longer share storage, by
    which save_pretrained would recognise the tie), so the saved files are the one-process ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in full.items() if k not in tied}


def save_sharded(module: nn.Module, opt: torch.optim.Optimizer, folder: Path, *, is_main: bool) -> None:
    """Every rank's shard of `module`'s weights and `opt`'s state into `folder` (torch.distributed.checkpoint),
    written under a temporary name and renamed into place by rank 0 once every rank has written: a kill
    leaves a whole folder or none. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()  # the folder exists, empty, before any rank writes into it
    model_sd, optim_sd = get_state_dict(module, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.distributed.barrier()  # every shard and the metadata are written
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)


def load_sharded(module: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """`module`'s weights and `opt`'s state back from a folder `save_sharded` wrote (every rank reads its
    own shard). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, opt)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def remove_sharded(run_path: Path, keep: str | None = None) -> None:
    """The sharded folders (and half-written temporary ones) of a run, all but `keep`. Rank 0 only."""
    for p in [*Path(run_path).glob(SHARDED_GLOB), *Path(run_path).glob(f".{SHARDED_GLOB}.tmp")]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
