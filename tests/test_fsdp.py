"""One run over two ranks with train.distributed=fsdp (FSDP2: sekd/distributed/fsdp.py), started through torchrun
as a user would: real processes, gloo on CPU, the tiny pair.

The bound is tests/test_distributed.py's ATOL = 1e-5, for the same reason: the math is the one-process
step (docs/method.md §9) and only float32 summation order differs. Here the gradient sum is FSDP's
reduce-scatter (each rank's partial sum, then the sum of the two shards' halves) per micro-batch,
accumulated over the micro-batches, instead of one batched sum: a few ulps per gradient, ~1e-7 in the
weights after two AdamW steps. A real error (a rank's gradients missing, a parameter not reduced, other
sequences) moves weights by the order of lr (2e-3). FSDP's default, the *average* over ranks, halves
every gradient, which AdamW's update mostly hides (it is scale-invariant up to eps and clipping):
measured 3e-4 after two steps, still 30 x ATOL; the logged loss and gradient norm (before clipping)
are compared too, at a relative 1e-5 for the same reason, and that norm halves.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ROOT,
    TINY,
    built_once,
    checkpoint_step,
    compose_cfg,
    descendants,
    logged_steps,
    sekd_train,
    tiny_cache,
)
from tests.test_distributed import (
    ATOL,
    ENV,
    TORCHRUN,
    TRACE,
    args,
    max_diff,
    one_process_runs,
    run_of,
    the_run,
    torchrun,
    two_ranks_and_one,
    weights,
    weights_of,
)


def torchrun_fsdp(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return torchrun(argv, timeout, mode="fsdp")


# GLS on 5 samples with the dense flow: its queue gathered inside FSDP's forward, and a short last global
# micro-batch (5 = 4 + 1) that leaves rank 1 a stand-in, whose zero backward must still join FSDP's
# reduce-scatters (without it the ranks would wait on each other forever)
SHORT = ["train.flow=dense", "data.token_budget=320"]


# Presets checked as cells of one multirun under torchrun (see tests/test_distributed.py's SWEPT), each against its
# one-process run there. se_kd3x: the student's sample pre-pass (top_student_entropy) before the student is sharded,
# the teacher loaded whole to build the offline cache (the ranks its workers) and released, training from the
# cache; top_smp: the pre-pass, then the teacher loaded whole and sharded beside the student (sharded first)
FSDP_SWEPT = ["full_kd", "se_kd", "se_kd3x", "top_smp"]


def fsdp_sweep(tmp_path_factory) -> Path:
    """The root holding every FSDP_SWEPT preset's run on 2 ranks x micro-batch 2 (fsdp), traced as the one-process
    runs are: one multirun under torchrun, built once a session."""

    def train_fsdp_sweep(folder: Path) -> None:
        (folder / "tmp").mkdir()
        tiny_cache(tmp_path_factory, folder / "cache")
        over = args(folder / "two", ",".join(FSDP_SWEPT), 2, TRACE)
        res = subprocess.run(
            [*TORCHRUN, "-m", *over, "train.distributed=fsdp"],
            cwd=ROOT,
            env={**ENV, "TMPDIR": str(folder / "tmp")},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once(tmp_path_factory, "fsdp-sweep", train_fsdp_sweep) / "two"


def assert_two_ranks_match_one(run: Path, one: Path, *keys: str) -> None:
    """The final weights within ATOL, and the logged `keys` per step at a relative 1e-5."""
    assert max_diff(weights_of(run), weights_of(one)) <= ATOL
    rows = lambda r: [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()]
    two_rows, one_rows = rows(run), rows(one)
    assert len(two_rows) == len(one_rows)
    for a, b in zip(two_rows, one_rows):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.xdist_group("fsdp")  # one worker builds the shared runs the others would wait for
@pytest.mark.parametrize(
    "preset, extra",
    [("full_kd", []), ("se_kd", []), ("gls", SHORT), ("se_kd3x", []), ("top_smp", [])],
    ids=["full_kd", "se_kd", "gls-dense-stand-in", "se_kd3x", "top_smp"],
)
def test_fsdp_on_two_ranks_trains_the_one_process_weights(tmp_path_factory, tmp_path, preset, extra):
    if preset in FSDP_SWEPT:
        run, one = (
            run_of(fsdp_sweep(tmp_path_factory), preset),
            run_of(one_process_runs(tmp_path_factory, preset), preset),
        )
    else:  # a run of its own: its data keys are no other test's
        tiny_cache(tmp_path_factory, tmp_path / "cache")
        two_ranks_and_one(tmp_path, preset, *extra, mode="fsdp")
        run, one = the_run(tmp_path / "two"), the_run(tmp_path / "one")
    assert_two_ranks_match_one(run, one, "loss", "grad_norm", "tokens_seen", "tokens_supervised")
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len(list(run.glob("*/record.json"))) == 1  # rank 0 scored the saved model and wrote the record
    assert not list(run.glob("*checkpoint*"))  # checkpoint.pt and its sharded folder gone with the final model


def test_an_fsdp_rank_loads_its_student_on_the_cpu_not_on_its_card(tmp_path):
    """Under fsdp the student is loaded on the CPU and the rank's card gets only its shard (fully_shard
    moves each unit there as the Trainer shards it): build_parts for rank 0 of 2 whose card is cuda:0
    loads the student on the CPU and computes on cuda:0. (On a machine without CUDA the old load onto the
    card raised; ddp still loads onto the card.) No process group: build_parts joins none."""
    from dataclasses import replace

    from sekd.app.compose import compose
    from sekd.app.training import build_parts, student_home
    from sekd.distributed.process_group import Dist

    job = compose(compose_cfg([*TINY, f"paths.root={tmp_path}", "experiment=se_kd", "eval=none"]), [])
    card = torch.device("cuda", 0)
    rank = Dist(rank=0, world_size=2, device=card)
    job = replace(job, cfg=replace(job.cfg, train=replace(job.cfg.train, distributed="fsdp")), dist=rank)
    parts = build_parts(job)
    assert parts.device == card and parts.teacher.home == card and not parts.teacher.loaded
    assert {p.device.type for p in parts.student.parameters()} == {"cpu"}
    assert parts.student.dtype == torch.float32  # the master weights, as on the card
    ddp = replace(job.cfg, train=replace(job.cfg.train, distributed="ddp"))
    assert student_home(ddp, rank, card) == card and student_home(job.cfg, Dist.single(card), card) == card


def test_killed_fsdp_run_resumes_on_two_ranks_to_the_same_weights(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    a = args(tmp_path / "a", "se_kd", 2, "train.ckpt_every=2", steps=6)
    done = torchrun_fsdp(a)
    assert done.returncode == 0, done.stderr[-3000:]

    root_b = tmp_path / "b"
    b = args(root_b, "se_kd", 2, "train.ckpt_every=2", steps=6)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [*TORCHRUN, *b, "train.distributed=fsdp"], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 300
        try:
            while proc.poll() is None and checkpoint_step(root_b) is None:
                assert time.time() < deadline, "the run never wrote a checkpoint"
                time.sleep(0.01)
        finally:
            if proc.poll() is None:  # the agent and both ranks, as a lost node would
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_step(root_b)
    assert saved in (2, 4)
    ck = torch.load(the_run(root_b) / "checkpoint.pt", weights_only=True)
    assert (the_run(root_b) / ck["sharded"]).is_dir() and "student" not in ck  # the weights are in the dcp folder

    resumed = torchrun_fsdp(b)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved}" in resumed.stdout + resumed.stderr
    assert max_diff(weights(tmp_path / "a"), weights(root_b)) == 0.0
    assert logged_steps(root_b) == list(range(1, 7))


@pytest.mark.parametrize(
    "extra, key",
    [
        (["experiment=on_policy_se_kd"], "regime=on_policy"),
        (["experiment=se_kd", "model.teacher_device=cpu"], "model.teacher_device=cpu"),
        (["experiment=se_kd", "train.optimizer=adam8bit"], "train.optimizer=adam8bit"),
    ],
)
def test_what_fsdp_does_not_do_is_refused_in_one_line(tmp_path, extra, key):
    r = sekd_train([f"paths.root={tmp_path}", "model=tiny", "logging=disabled", *extra, "train.distributed=fsdp"])
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("sekd: config error: ") and key in line and "fsdp" in line
    assert not (tmp_path / "runs").exists()


def test_fsdp_checkpoint_is_refused_by_an_unsharded_run(tmp_path):
    """A checkpoint of the other form than the run's train.distributed (the run folder does not hash it)
    is one line, not a crash in load_state_dict."""
    from sekd.training.checkpoint import CheckpointError, load_checkpoint

    ck = tmp_path / "checkpoint.pt"
    (tmp_path / "checkpoint-2.dcp").mkdir()
    torch.save({"sharded": "checkpoint-2.dcp", "schedule": {}, "progress": {}, "rng": {}, "selector": {}}, ck)
    assert load_checkpoint(ck, sharded=True)["sharded"] == "checkpoint-2.dcp"
    with pytest.raises(CheckpointError, match="written by train.distributed=fsdp"):
        load_checkpoint(ck, sharded=False)
    (tmp_path / "checkpoint-2.dcp").rmdir()
    with pytest.raises(CheckpointError, match="checkpoint-2.dcp, is missing"):
        load_checkpoint(ck, sharded=True)
    assert Path(ck).exists()


# train.fsdp.mesh: a 2-D (replicate, shard) mesh (HSDP: reduce-scatter within a shard group, all-reduce across
# replicas, both summing) trains the one-process weights too. 2x1: two replicas of one rank each (every weight
# whole, all-reduced); hybrid: the ranks per node (torchrun's LOCAL_WORLD_SIZE, 2 here) shard, one replica: 1x2.
@pytest.mark.xdist_group("fsdp")
@pytest.mark.parametrize("mesh", ["2x1", "hybrid"])
def test_fsdp_on_a_two_dimensional_mesh_trains_the_one_process_weights(tmp_path_factory, tmp_path, mesh):
    tiny_cache(tmp_path_factory, tmp_path / "cache")
    two = torchrun_fsdp(args(tmp_path / "two", "se_kd", 2, TRACE, f"train.fsdp.mesh={mesh}"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_of(one_process_runs(tmp_path_factory, "se_kd"), "se_kd")  # one process: no mesh, the same run
    assert_two_ranks_match_one(the_run(tmp_path / "two"), one, "loss", "grad_norm")


def test_the_fsdp_mesh_is_read_and_checked_in_one_line():
    from sekd.core.errors import ConfigError
    from sekd.config.schema import FsdpConfig, TrainConfig
    from sekd.distributed.fsdp import mesh_shape, ranks_per_node

    assert TrainConfig().fsdp.mesh == "flat"
    for bad in ("2d", "0x4", "4x", "hsdp", 2):
        with pytest.raises(ConfigError, match=r"^train\.fsdp\.mesh=") as err:
            FsdpConfig(mesh=bad)
        assert "\n" not in str(err.value)
    assert mesh_shape("flat", 16, {}) == (16,)
    assert mesh_shape("2x8", 16, {}) == (2, 8)
    assert mesh_shape("hybrid", 16, {"LOCAL_WORLD_SIZE": "8"}) == (2, 8)
    assert mesh_shape("hybrid", 16, {"SLURM_NTASKS_PER_NODE": "4"}) == (4, 4)
    assert ranks_per_node({"SLURM_TASKS_PER_NODE": "8(x2)"}) == 8 and ranks_per_node({}) is None
    for spec, env, text in [
        ("3x2", {}, "does not cover the 16 ranks"),
        ("hybrid", {}, "needs the ranks per node"),
        ("hybrid", {"LOCAL_WORLD_SIZE": "3"}, "does not cover the 16 ranks"),
    ]:
        with pytest.raises(ConfigError, match=rf"^train\.fsdp\.mesh={spec}.*{text}"):
            mesh_shape(spec, 16, env)


@pytest.mark.parametrize(
    "version, ok",
    [
        ("2.13.0+cpu", True),
        ("2.8.0", True),
        ("2.8.0a0+git1234", True),
        ("2.10.0.dev20250801+cu128", True),
        ("3.0.0", True),
        ("2.7.1+cu126", False),
        ("2.6.0", False),
        ("1.13.1", False),
        ("unknown", False),
    ],
)
def test_fsdp_needs_a_recent_enough_torch(version, ok):
    """fsdp_support: None where the torch has everything sekd/distributed/fsdp.py uses, else one line naming the version
    it needs and the way out."""
    from sekd.distributed.fsdp import FSDP_MIN_TORCH, fsdp_support

    why = fsdp_support(version)
    if ok:
        assert why is None
    else:
        assert why == (
            f"train.distributed=fsdp needs torch >= {FSDP_MIN_TORCH} (FSDP2's fully_shard and "
            "MixedPrecisionPolicy in torch.distributed.fsdp, set_gradient_divide_factor, "
            f"set_force_sum_reduction_for_comms), but this is torch {version}; upgrade torch, or use "
            "train.distributed=ddp"
        )
    assert fsdp_support(torch.__version__) is None  # the torch these tests run on has all of it


def test_the_installed_torch_has_what_sharding_uses():
    """What FSDP_MIN_TORCH stands for, present in this torch (fsdp_support lets it through)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: F401

    assert hasattr(FSDPModule, "set_gradient_divide_factor") and hasattr(
        FSDPModule, "set_force_sum_reduction_for_comms"
    )


def _shard_in_bf16(rank: int, port: int, out: str) -> None:
    from sekd.distributed.process_group import init
    from sekd.distributed.launch import Launch
    from sekd.training.trainer import StudentLoss
    from sekd.distributed.fsdp import shard_student, shard_teacher
    from tests.training.test_trainer import tiny_model

    torch.set_num_threads(1)
    dist = init(Launch(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port), "cpu")
    student, teacher = tiny_model(0), tiny_model(1).to(torch.bfloat16)
    shard_teacher(teacher, dist.device, dtype=torch.bfloat16, mesh="2x1")
    root = StudentLoss(student, vocab=64, chunk_size=5, flow="dense")
    shard_student(root, student, dist.device, dtype=torch.bfloat16, mesh="2x1")

    def policy(unit):  # FSDP2's state of a unit (a private attribute: what fully_shard was given)
        p = unit._get_fsdp_state()._mp_policy
        return [str(p.param_dtype), str(p.reduce_dtype), p.cast_forward_inputs]

    layer = next(student.model.layers[0].parameters())
    got = {
        "mesh": list(layer.device_mesh.shape),
        "names": list(layer.device_mesh.mesh_dim_names),
        "placements": [repr(p) for p in layer.placements],
        "layer": policy(student.model.layers[0]),
        "root": policy(root),
        "teacher_layer": policy(teacher.model.layers[0]),
        "teacher": policy(teacher.model),
        "master": str(layer.dtype),
    }
    dist.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_bf16_layers_gather_in_bf16_and_reduce_in_float32_on_a_hybrid_mesh(tmp_path):
    """Under bf16 the student's layers gather their weights in bf16 and reduce gradients in float32 into float32
    master shards; its root unit (embeddings, norm, head) stays float32 (the chunked flow accumulates the head's
    gradient in its parameters' dtype); the teacher gathers in bf16; no unit casts its inputs. train.fsdp.mesh=2x1
    is a 2-D (replicate, shard) mesh: each weight Replicate() x Shard(0)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_in_bf16, args=(port, str(tmp_path)), nprocs=2)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["mesh"] == [2, 1] and got["names"] == ["replicate", "shard"]
    assert got["placements"] == ["Replicate()", "Shard(dim=0)"] and got["master"] == "torch.float32"
    assert got["layer"] == ["torch.bfloat16", "torch.float32", False]
    assert got["root"] == ["None", "torch.float32", False]
    assert got["teacher_layer"] == got["teacher"] == ["torch.bfloat16", "torch.float32", False]


def test_a_mesh_that_does_not_cover_the_ranks_is_refused_before_any_model_loads(tmp_path):
    """3x1 over 2 ranks: every rank stops with the one line naming train.fsdp.mesh, from the launch check,
    before the pair is built or loaded (paths.cache stays empty)."""
    r = torchrun_fsdp(args(tmp_path / "root", "se_kd", 2, "train.fsdp.mesh=3x1"), timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sekd: config error:")]
    assert lines and all("train.fsdp.mesh=3x1" in ln for ln in lines), r.stderr[-2000:]
    assert not (tmp_path / "root" / "runs").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
