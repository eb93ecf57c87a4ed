"""The training loop (sekd/training/trainer.py): the micro-batch split does not change the step; a run killed after a
checkpoint resumes to the same weights."""

import json
import pytest
import torch
from safetensors.torch import load_file

from sekd.data.packing import PackedData
from sekd.embedded.build import qwen3_config
from sekd.kd.objective import IGNORE, Selector
from sekd.selection.criteria import forward_kl
from sekd.selection.policies import POLICIES
from sekd.selection.signals import SIGNALS
from sekd.training.trainer import Trainer
from sekd.config.schema import TrainConfig
from tests.helpers import TINY, checkpoint_step, logged_steps, sekd_train, sekd_train_killed

V, T = 64, 16


def tiny_model(seed: int):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    spec = {"hidden_size": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 64}
    return Qwen3ForCausalLM(qwen3_config(spec, V, 0))


def packed(n=4, seed=0) -> PackedData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, T), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, -1] = IGNORE
    y[1, 5] = IGNORE  # a document boundary
    return PackedData(input_ids=x, labels=y, sample_ids=[f"s{i}" for i in range(n)])


def trainer(
    mb: int, accum: int, policy="all", signal=None, normalization="per_sequence", flow="dense", *, n=4, dist=None
):
    t = TrainConfig(
        flow=flow,
        chunk_size=5,
        lr=1e-3,
        steps=1,
        epochs=1,
        micro_batch_size=mb,
        grad_accum=accum,
        normalization=normalization,
        max_grad_norm=None,
        log_every=1,
        ckpt_every=0,
    )
    opts = {"k": 0.25} if policy != "all" else {}
    sel = Selector(
        signal=SIGNALS.get(signal) if signal else None, policy=POLICIES.build(policy, **opts), criterion=forward_kl
    )
    return Trainer(
        student=tiny_model(0),
        teacher=tiny_model(1).eval(),
        data=packed(n),
        selector=sel,
        train_cfg=t,
        vocab=V,
        seed=0,
        run=None,
        tracker=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
        dist=dist,
    )


@pytest.mark.parametrize("policy,signal", [("all", None), ("top_k", "student_entropy")])
@pytest.mark.parametrize("normalization", ["per_sequence", "batch_tokens"])
@pytest.mark.parametrize("flow", ["dense", "chunked"])
def test_gradient_accumulation_does_not_change_the_step(policy, signal, normalization, flow):
    """The effective batch of 4 split as 4x1, 2x2 and 1x4 gives the same loss and gradients."""
    from sekd.training.batches import micro_batches

    results = []
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        tr = trainer(mb, accum, policy, signal, normalization, flow)
        loss = tr.accumulate(micro_batches(tr.data, mb, tr.seed, tr.prog)).loss
        grads = {n: p.grad.clone() for n, p in tr.student.named_parameters()}
        results.append((loss, grads))
    (loss0, g0), *rest = results
    for loss, g in rest:
        assert loss == pytest.approx(loss0, rel=1e-5)
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy,signal", [("all", None), ("top_k", "kl")])
def test_chunked_flow_takes_the_same_step_as_the_dense_flow(policy, signal):
    """Through real HF models: every student gradient of the chunked flow equals the dense one."""
    from sekd.training.batches import micro_batches

    grads = {}
    for flow in ("dense", "chunked"):
        tr = trainer(2, 2, policy, signal, "per_sequence", flow)
        loss = tr.accumulate(micro_batches(tr.data, 2, tr.seed, tr.prog)).loss
        grads[flow] = (loss, {n: p.grad.clone() for n, p in tr.student.named_parameters()})
    assert grads["chunked"][0] == pytest.approx(grads["dense"][0], rel=1e-5)
    for n, g in grads["dense"][1].items():
        torch.testing.assert_close(grads["chunked"][1][n], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flow", ["dense", "chunked"])
def test_a_stand_in_keeps_no_autograd_graph(flow):
    """A stand-in micro-batch (a rank's share of a short last global micro-batch, run again at zero weight)
    has no backward outside fsdp: its forward records no graph (no activations kept for a backward that
    never comes); a real micro-batch's does."""
    from sekd.training.batches import StandIn

    tr = trainer(1, 1, flow=flow)
    real, _ = tr.forward([0])
    stand_in, _ = tr.forward(StandIn([0]))
    assert real.loss_sum.requires_grad and real.loss_sum.grad_fn is not None
    assert not stand_in.loss_sum.requires_grad and stand_in.loss_sum.grad_fn is None
    assert stand_in.loss_sum.item() == pytest.approx(real.loss_sum.item(), rel=1e-6)  # the same sequence


def final_weights(root):
    (model,) = list(root.glob("runs/*/model/model.safetensors"))
    return load_file(model)


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("se_kd", []),
        ("gls", []),  # its score queue must survive the restart
        ("on_policy_se_kd", ["data.seq_len=128", "regime.max_new_tokens=8"]),  # the same sampled answers after it
    ],
)
def test_killed_run_resumes_to_the_same_weights(tmp_path, preset, extra):
    cache = f"paths.cache={tmp_path}/cache"
    args = [
        *TINY,
        f"experiment={preset}",
        "train.steps=5",
        "train.ckpt_every=2",
        "train.trace_selection_steps=5",
        "eval=none",
        cache,
        *extra,
    ]
    done = sekd_train([*args, f"paths.root={tmp_path}/a"])
    assert done.returncode == 0, done.stderr[-3000:]

    # killed (SIGKILL) once step 3 is logged: checkpoint.pt holds step 2, step 3 is lost. A slow poll may
    # let it reach the step-4 checkpoint first; the resume must then start there, to the same weights.
    root_b = tmp_path / "b"
    killed = sekd_train_killed([*args, f"paths.root={root_b}"], ready=lambda: 3 in logged_steps(root_b))
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run_b,) = list((root_b / "runs").iterdir())
    assert logged_steps(root_b)[:3] == [1, 2, 3] and not list(run_b.glob("*/record.json"))
    saved = checkpoint_step(root_b)  # loads with weights_only=True: no pickled objects
    assert saved in (2, 4)

    resumed = sekd_train([*args, f"paths.root={root_b}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved}" in resumed.stdout + resumed.stderr
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(ln)["step"] for ln in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the rows of the lost steps were replaced, not duplicated
    (run_a,) = list((tmp_path / "a" / "runs").iterdir())
    assert (run_a / "selection_trace.jsonl").read_text() == (run_b / "selection_trace.jsonl").read_text()
    assert not (run_b / "checkpoint.pt").exists()  # the final model supersedes it

    again = sekd_train([*args, f"paths.root={tmp_path}/b"])
    assert again.returncode == 0 and "already done" in again.stdout


def test_the_steps_counts_travel_as_one_tensor():
    """StepCounts: one float64 tensor for the one all-reduce of a step, and back, field by field; one process
    sums nothing."""
    from sekd.distributed.process_group import Dist
    from sekd.training.trainer import StepCounts

    counts = StepCounts(1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    t = counts.to_tensor()
    assert t.dtype == torch.float64 and t.tolist() == [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert StepCounts.from_tensor(t) == counts
    assert counts.summed(Dist.single()) is counts
    assert counts.loss == 1.5 / 2.0 and counts.selected_fraction == 3.0 / 4.0
    assert StepCounts().loss == 0.0 and StepCounts().scale == 1e12  # an empty step divides by nothing
