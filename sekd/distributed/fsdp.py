"""train.distributed=fsdp: the student and the teacher sharded over the ranks with FSDP2 (docs/method.md §9,
"Sharded models").

Student: each decoder layer is one FSDP unit, and the root unit is the module whose forward is the whole
per-micro-batch loss (sekd.training.trainer.StudentLoss), not the Hugging Face model: the chunked flow never
calls the model's forward, so hooks on it would neither unshard the embeddings, norm and head nor reduce
their gradients. Gradients are summed over ranks (divide factor 1); the loop divides once per step. Under
bf16 the layers gather in the compute dtype and reduce in float32; the root unit keeps float32 parameters.
Teacher: inference only, its layers and decoder resharded after each forward, its LM head a replicated
(untied) copy. Checkpoints go through torch.distributed.checkpoint, every rank writing its shard.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from sekd.core.errors import ConfigError
from sekd.core.files import storage_error

if TYPE_CHECKING:
    from sekd.distributed.process_group import Dist

SHARDED_GLOB = "checkpoint-*.dcp"  # the sharded folders of a run; checkpoint.pt names the live one
# The first torch with all this module uses: fully_shard and MixedPrecisionPolicy public in torch.distributed.fsdp
# (2.6), FSDPModule.set_gradient_divide_factor and set_force_sum_reduction_for_comms (2.8).
FSDP_MIN_TORCH = "2.8"


def fsdp_support(version: str) -> str | None:
    """Why train.distributed=fsdp cannot run on torch `version` (one line), or None when it can. A pre-release
    or local build of FSDP_MIN_TORCH (2.8.0a0+git..., 2.8.0.dev2025...) counts as that version."""
    found = re.match(r"\s*(\d+)\.(\d+)", str(version))
    need = tuple(int(v) for v in FSDP_MIN_TORCH.split("."))
    if found and (int(found[1]), int(found[2])) >= need:
        return None
    return (
        f"train.distributed=fsdp needs torch >= {FSDP_MIN_TORCH} (FSDP2's fully_shard and MixedPrecisionPolicy in "
        f"torch.distributed.fsdp, set_gradient_divide_factor, set_force_sum_reduction_for_comms), but this is "
        f"torch {version}; upgrade torch, or use train.distributed=ddp"
    )


def ranks_per_node(environ: Mapping[str, str] = os.environ) -> int | None:
    """The ranks on each node: torchrun's LOCAL_WORLD_SIZE, else Slurm's SLURM_NTASKS_PER_NODE (or the first
    count of SLURM_TASKS_PER_NODE, "4(x2)"); None when the launcher gave neither."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        found = re.match(r"\s*(\d+)", environ.get(key, ""))
        if found and int(found[1]) > 0:
            return int(found[1])
    return None


def mesh_shape(spec: str, world_size: int, environ: Mapping[str, str] = os.environ) -> tuple[int, ...]:
    """train.fsdp.mesh as a mesh shape: (world,) for flat; (replicas, shard size) for hybrid (shard size =
    the ranks per node) and RxS. One line naming the key for one that does not fit the world."""
    if spec == "flat":
        return (world_size,)
    if spec == "hybrid":
        per_node = ranks_per_node(environ)
        if per_node is None:
            raise ConfigError(
                "train.fsdp.mesh=hybrid needs the ranks per node (torchrun's LOCAL_WORLD_SIZE or "
                "Slurm's SLURM_NTASKS_PER_NODE), and the launcher set neither; give the mesh as RxS"
            )
        shape = (world_size // per_node, per_node)
    else:
        r, s = spec.split("x")
        shape = (int(r), int(s))
    if shape[0] * shape[1] != world_size:
        raise ConfigError(
            f"train.fsdp.mesh={spec}: a {shape[0]}x{shape[1]} mesh (replicas x shard size) does not "
            f"cover the {world_size} ranks; the product must equal the number of ranks"
        )
    return shape


def device_mesh(device: torch.device, spec: str = "flat"):
    """FSDP's device mesh (train.fsdp.mesh): the 1-D mesh of every rank (the default process group) for flat;
    a 2-D ("replicate", "shard") mesh for hybrid and RxS (HSDP: fully_shard shards over "shard" and
    replicates over "replicate")."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(spec, torch.distributed.get_world_size())
    if len(shape) == 1:
        return init_device_mesh(device.type, shape)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


def precision(dtype: torch.dtype | None):
    """FSDP2's mixed precision for compute dtype `dtype`: weights gathered in it (None: as stored, for
    float32), gradients reduced in float32. A unit's inputs are not cast (cast_forward_inputs=False): autocast
    runs the matmuls in `dtype` anyway, and the residual stream between layers keeps the dtype it has in one
    process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = dtype is not None and dtype != torch.float32
    return MixedPrecisionPolicy(
        param_dtype=dtype if low else None, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Qwen3, Llama, ...): the bulk of the weights."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"train.distributed=fsdp: {type(model).__name__} has no decoder .layers to shard")
    return list(layers)


def shard_student(
    root: nn.Module,
    model: PreTrainedModel,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    mesh: str = "flat",
) -> None:
    """FSDP2 units: each decoder layer of `model` (gathered in the compute `dtype`), then `root` (the module
    whose forward is the loss and which holds `model`) for the rest (float32). Reductions sum in float32
    instead of averaging over ranks; `mesh` is train.fsdp.mesh."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    m = device_mesh(device, mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=m, mp_policy=precision(dtype))
    fully_shard(root, mesh=m, mp_policy=precision(None))
    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)  # Σ over ranks; the loop divides once by Σ s_i
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def shard_teacher(
    teacher: PreTrainedModel, device: torch.device, *, dtype: torch.dtype = torch.float32, mesh: str = "flat"
) -> None:
    """The frozen teacher sharded for inference: its decoder layers and its decoder (embeddings, norm),
    gathered in the compute `dtype` and resharded after each forward; the LM head stays replicated (untied
    from the embedding first). `mesh` is train.fsdp.mesh."""
    from torch.distributed.fsdp import fully_shard

    untie_head(teacher)
    m = device_mesh(device, mesh)
    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=m, reshard_after_forward=True, mp_policy=precision(dtype))
    fully_shard(teacher.get_decoder(), mesh=m, reshard_after_forward=True, mp_policy=precision(dtype))


def untie_head(model: PreTrainedModel) -> None:
    """A head tied to the input embedding gets its own copy of the weights, so sharding the embedding
    leaves the head whole on every rank."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return
    weight = head.weight
    if isinstance(weight, nn.Parameter) and weight is embed.weight:
        head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


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

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))  # a model's: tensors
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in full.items() if k not in tied}


def save_sharded(module: nn.Module, opt: torch.optim.Optimizer, folder: Path, dist: Dist) -> None:
    """Every rank's shard of `module`'s weights and `opt`'s state into `folder` (torch.distributed.checkpoint),
    written under a temporary name and renamed into place by rank 0 once every rank has written: a kill
    leaves a whole folder or none, and only a whole one is named by checkpoint.pt. A storage fault on any
    rank stops every rank, rank 0 naming `folder` and the cause. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    dist.main_writes(lambda: fresh_folder(tmp, folder))  # it exists, empty, before any rank writes into it
    model_sd, optim_sd = get_state_dict(module, opt)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except CheckpointException as err:  # every rank gets it, with every rank's error: a BaseException
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # no half folder is left to be taken for a whole one
        raise sharded_fault(err, folder, dist.is_main) from None
    dist.main_writes(lambda: in_place(tmp, folder))  # every shard and the metadata are written


def fresh_folder(tmp: Path, folder: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise (storage_error(err, folder) or err) from err


def in_place(tmp: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError as err:
        raise (storage_error(err, folder) or err) from err


def sharded_fault(err: BaseException, folder: Path, is_main: bool) -> Exception:
    """The error a failed sharded save raises on this rank: the first rank's storage fault naming `folder`
    (rank 0; the others echo it quietly), else a plain RuntimeError with torch's account of every rank."""
    from sekd.core.errors import EchoedFault

    failures = getattr(err, "failures", {})
    for rank in sorted(failures):
        fault = storage_error(failures[rank][0], folder) or lost_write(failures[rank][0], folder)
        if fault is not None:
            return fault if is_main else EchoedFault(f"rank {rank}: {fault}")
    return RuntimeError(f"{folder}: the sharded checkpoint failed: {err}")


def lost_write(err: BaseException, folder: Path) -> OSError | None:
    """torch's zip writer, writing a shard to a file name, reports a write the disk refused as "unexpected pos"
    and drops the OSError: on a disk with (almost) nothing left, that was no space left."""
    if not (isinstance(err, RuntimeError) and "unexpected pos" in str(err)):
        return None
    disk = next(p for p in (folder, *folder.parents) if p.exists())
    if shutil.disk_usage(disk).free >= 2**20:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


def load_sharded(module: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """`module`'s weights and `opt`'s state back from a folder `save_sharded` wrote (every rank reads its
    own shard). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, opt)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def remove_unfinished(run_path: Path) -> None:
    """The temporary sharded folders a killed or faulted save left (never named by checkpoint.pt): their
    room back before the run writes again. Rank 0, under the run folder's lock."""
    for p in Path(run_path).glob(f".{SHARDED_GLOB}.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def remove_sharded(run_path: Path, keep: str | None = None) -> None:
    """The sharded folders (and half-written temporary ones) of a run, all but `keep`. Rank 0 only."""
    for p in [*Path(run_path).glob(SHARDED_GLOB), *Path(run_path).glob(f".{SHARDED_GLOB}.tmp")]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
