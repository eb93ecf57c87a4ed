"""One run over two ranks (train.distributed=ddp), started through torchrun as a user would: real
processes, gloo on CPU, the tiny pair.

Same math at any world size: 2 ranks x micro-batch 2 see the sequences 1 rank x micro-batch 4 sees
(docs/method.md §9), so the final weights agree up to float32 rounding. The bound, ATOL = 1e-5: the
only difference is the order of the gradient sums (two per-rank partial sums, then the all-reduce, vs
one batched sum), a few float32 ulps (~1e-7 relative) per gradient; AdamW turns a relative gradient
error d into an update error of about lr * d, so after a handful of steps the weights (O(1)) differ by
~1e-7 (measured: 6e-8 after 3 steps of Full KD). A real error — a rank's gradients missing, the division done per rank, other
sequences — moves weights by the order of lr (2e-3) per step; the test checks that a run on half the
batch is farther than 100 x ATOL, so the bound tells them apart. Two steps: from the second on, the
rounding moves a selective signal u(t) by ~1e-6, and a top-k boundary on a near-tie can flip (one
position more or less, a discrete change of the loss) — as it can between two micro-batch splits of
one process; both steps' selections are checked equal in the trace.

On-policy (on_policy_full_kd): each sample's answer is drawn from its own key (run seed, step, global
sample index; sekd/kd/on_policy.py), by inverse CDF of one uniform per token, so both runs sample the
same tokens unless rounding (logits ~1e-7 apart, from batches of other shapes) moves a cumulative
probability across a uniform: ~1e-7 per token, ~1e-4 over the few hundred tokens of this test. The
trace checks the answers' lengths equal (its supervised positions), and a single different token
would move the weights by ~lr, far outside ATOL: the same bound holds, and a failure would mean a
flipped draw (rare, and visible in the trace) or a real error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, TINY, built_once, checkpoint_step, descendants, logged_steps, sekd_train, tiny_cache

ATOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "sekd.train"]


def args(root: Path, preset: str, mb: int, *extra: str, steps: int = 2) -> list[str]:
    """The tiny run's command line; an `extra` override replaces TINY's value of its key. The ranks are gloo
    processes on the CPU in fp32 even on a GPU machine: the 1e-5 bound holds in fp32 only (docs/method.md §9;
    benchmarks/multi_gpu_check.sh makes the same check on cards, in fp32)."""
    over = {"train.micro_batch_size": str(mb), "train.device": "cpu", "train.precision": "fp32"}
    replaced = {*over, *(e.split("=")[0] for e in extra)}
    base = [a for a in TINY if a.split("=")[0] not in replaced]
    return [
        *base,
        *(f"{k}={v}" for k, v in over.items()),
        f"experiment={preset}",
        f"train.steps={steps}",
        "eval=none",
        f"paths.root={root}",
        f"paths.cache={root.parent}/cache",
        *extra,
    ]


def torchrun(argv: list[str], timeout: int = 300, mode: str = "ddp") -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, *argv, f"train.distributed={mode}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def two_ranks_and_one(tmp_path: Path, preset: str, *extra: str, mode: str = "ddp") -> None:
    """The preset on 2 ranks x micro-batch 2 (tmp_path/two) and on one process x micro-batch 4 (tmp_path/one),
    the same global batch: both finish, and their final weights agree within ATOL."""
    two = torchrun(args(tmp_path / "two", preset, 2, *extra), mode=mode)
    assert two.returncode == 0, two.stderr[-3000:]
    one = sekd_train(args(tmp_path / "one", preset, 4, *extra), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    assert max_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= ATOL


def torchrun_killed(argv: list[str], ready, timeout: int = 300) -> int:
    """torchrun until `ready()` holds, then SIGKILL to it and every process below it (the agent and both
    ranks, which torchrun starts in sessions of their own), as a lost node would. Returns its exit status."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [*TORCHRUN, *argv, "train.distributed=ddp"], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and not ready():
                assert time.time() < deadline, "the run never got there"
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode


def weights(root: Path) -> dict[str, torch.Tensor]:
    (model,) = list(root.glob("runs/*/model/model.safetensors"))
    return load_file(model)


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def the_run(root: Path) -> Path:
    (run,) = list((root / "runs").iterdir())
    return run


# the tiny pair's 512-token vocabulary spells arithmetic problems in more than 64 tokens; short answers keep it quick
PRESET_EXTRA = {"on_policy_full_kd": ["data.seq_len=128", "regime.max_new_tokens=8"]}
TRACE = "train.trace_selection_steps=2"
# Presets checked as cells of one multirun on each side (torchrun's two ranks; one process): the same runs as one
# run each (a cell is a run of its own, in its own process group), for one process start instead of one per preset.
# full_kd (scored, and the half-batch check) and on_policy_full_kd (its own data keys) run alone, as plain runs.
SWEPT = ["se_kd", "curriculum", "se_kd3x", "gls", "pos_rs", "rs_kd", "top_smp"]
OMP1 = {"OMP_NUM_THREADS": "1"}


def run_of(root: Path, preset: str) -> Path:
    """The run folder of `preset` under root (<preset>-s<seed>-<hash>; one per preset)."""
    (run,) = [p for p in (root / "runs").iterdir() if p.name.startswith(f"{preset}-s")]
    return run


def one_process_runs(tmp_path_factory, preset: str) -> Path:
    """The root holding `preset`'s one-process run at micro-batch 4 (the global batch of 2 ranks x 2), traced:
    every test comparing two ranks with one process reads it (tests/test_fsdp.py too), built once a session.
    Every SWEPT preset and full_kd are cells of one multirun."""
    if preset in ("full_kd", *SWEPT):
        presets, name = ",".join(["full_kd", *SWEPT]), "one-process"
    else:
        presets, name = preset, f"one-process-{preset}"

    def train_one_process(folder: Path) -> None:
        tiny_cache(tmp_path_factory, folder / "cache")
        over = args(folder / "one", presets, 4, TRACE, *PRESET_EXTRA.get(preset, []))
        res = sekd_train(["-m", *over] if "," in presets else over, env=OMP1)
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once(tmp_path_factory, name, train_one_process) / "one"


def two_ranks(tmp_path_factory, preset: str) -> Path:
    """The root holding `preset`'s run on 2 ranks x micro-batch 2 (ddp, torchrun), traced, built once a session.
    full_kd is scored too (eval=embedded, 8 documents a task): tests/test_distributed_scoring.py and
    tests/test_placement.py read its record. The SWEPT presets are the cells of one multirun under torchrun;
    rank 1's Hydra output goes to <root>/tmp (tempfile reads TMPDIR)."""
    if preset in SWEPT:
        name, presets, extra = "ddp-sweep", ",".join(SWEPT), []
    else:
        name, presets = f"ddp-{preset}", preset
        extra = ["eval=embedded", "eval.limit=8"] if preset == "full_kd" else PRESET_EXTRA.get(preset, [])

    def train_two_ranks(folder: Path) -> None:
        (folder / "tmp").mkdir()
        tiny_cache(tmp_path_factory, folder / "cache")
        over = args(folder / "two", presets, 2, TRACE, *extra)
        res = subprocess.run(
            [*TORCHRUN, *(["-m", *over] if "," in presets else over), "train.distributed=ddp"],
            cwd=ROOT,
            env={**ENV, "TMPDIR": str(folder / "tmp")},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once(tmp_path_factory, name, train_two_ranks) / "two"


@pytest.mark.xdist_group("ddp")  # one worker builds the shared runs the others would wait for
@pytest.mark.parametrize("preset", ["full_kd", *SWEPT, "on_policy_full_kd"])
def test_two_ranks_train_the_one_process_weights(tmp_path_factory, tmp_path, preset):
    one_root, two_root = one_process_runs(tmp_path_factory, preset), two_ranks(tmp_path_factory, preset)
    run, one = run_of(two_root, preset), run_of(one_root, preset)
    assert max_diff(weights_of(run), weights_of(one)) <= ATOL

    # rank 0 alone wrote the shared files: one metrics row per step, one record, the trace of every rank's rows
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len(list(run.glob("*/record.json"))) == 1
    rows = [json.loads(ln) for ln in (run / "selection_trace.jsonl").read_text().splitlines()]
    one_rows = [json.loads(ln) for ln in (one / "selection_trace.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4  # steps x grad_accum x global micro-batch
    assert [(r["step"], r["sample"], sorted(r["selected"])) for r in rows] == [
        (r["step"], r["sample"], sorted(r["selected"])) for r in one_rows
    ]
    if preset not in SWEPT:  # a plain run: rank 1's Hydra log went elsewhere (a multirun's: test below)
        assert len(list((two_root / "hydra").iterdir())) == 1
    stats = json.loads((run / "train_stats.json").read_text())
    one_stats = json.loads((one / "train_stats.json").read_text())
    for key in ("tokens_seen", "tokens_supervised", "steps"):
        assert stats[key] == one_stats[key], key

    if preset == "full_kd":  # the bound separates: half the batch lands far outside it
        tiny_cache(tmp_path_factory, tmp_path / "cache")
        half = sekd_train([*args(tmp_path / "half", preset, 2)], env=OMP1)
        assert half.returncode == 0, half.stderr[-3000:]
        assert max_diff(weights(tmp_path / "half"), weights_of(one)) > 100 * ATOL


def test_killed_two_rank_run_resumes_to_the_same_weights(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    a = args(tmp_path / "a", "se_kd", 2, "train.ckpt_every=2", steps=8)
    done = torchrun(a)
    assert done.returncode == 0, done.stderr[-3000:]

    root_b = tmp_path / "b"
    b = args(root_b, "se_kd", 2, "train.ckpt_every=2", steps=8)
    assert torchrun_killed(b, ready=lambda: checkpoint_step(root_b) is not None) == -signal.SIGKILL
    saved = checkpoint_step(root_b)
    assert saved in (2, 4, 6) and not list(the_run(root_b).glob("*/record.json"))

    resumed = torchrun(b)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved}" in resumed.stdout + resumed.stderr
    wa, wb = weights(tmp_path / "a"), weights(root_b)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert logged_steps(root_b) == list(range(1, 9))  # the lost steps' rows replaced, not duplicated


@pytest.mark.xdist_group("ddp")
def test_a_multirun_under_torchrun_trains_each_cell_over_both_ranks(tmp_path_factory):
    """`torchrun ... -m sekd.train -m experiment=se_kd,curriculum,... train.distributed=ddp` (the SWEPT presets'
    runs above): Hydra's basic launcher runs the cells one after another in each rank; each cell joins a process
    group and leaves it at its end, so the next one can join again. Each cell ends with the weights of its own
    one-process run (same bound as above; the test above checks each); rank 0 alone writes the sweep's folder,
    rank 1's goes to a temporary folder."""
    two, one = two_ranks(tmp_path_factory, SWEPT[0]), one_process_runs(tmp_path_factory, SWEPT[0])

    # the same run folders (named by the global micro-batch) as the one-process cells, each with its weights
    runs = sorted(p.name for p in (two / "runs").iterdir())
    assert len(runs) == len(SWEPT) and set(runs) <= {p.name for p in (one / "runs").iterdir()}
    got = {r: load_file(two / "runs" / r / "model" / "model.safetensors") for r in runs}
    for r in runs:
        assert max_diff(got[r], load_file(one / "runs" / r / "model" / "model.safetensors")) <= ATOL, r
        run = two / "runs" / r
        assert len(list(run.glob("*/record.json"))) == 1
        assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert max_diff(got[runs[0]], got[runs[1]]) > 100 * ATOL  # two cells, two different runs

    # rank 0's sweep folder alone under paths.root; rank 1's multirun.yaml and job folders in its own
    cells = sorted([str(i) for i in range(len(SWEPT))] + ["multirun.yaml"])
    (swept,) = list((two / "hydra").iterdir())
    assert sorted(p.name for p in swept.iterdir()) == cells
    (own,) = list((two.parent / "tmp").glob("sekd-rank1-*"))
    assert sorted(p.name for p in own.iterdir()) == cells


def test_ddp_without_a_launcher_is_refused(tmp_path):
    r = sekd_train([*args(tmp_path, "full_kd", 2), "train.distributed=ddp"])
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("sekd: config error: train.distributed=ddp needs a launcher") and "torchrun" in line
    assert not (tmp_path / "runs").exists()


def test_ranks_without_a_distributed_mode_are_refused(tmp_path):
    r = subprocess.run(
        [*TORCHRUN, *args(tmp_path, "full_kd", 2)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0
    assert "sekd: config error: train.distributed=none but this process is rank" in r.stderr
    assert not (tmp_path / "runs").exists()


def _collectives(rank: int, port: int, out: str) -> None:
    from sekd.distributed.process_group import GradBuckets, init
    from sekd.distributed.launch import Launch

    torch.set_num_threads(1)
    dist = init(Launch(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port), "cpu")
    got = {
        "cat": dist.all_gather_cat(torch.arange(rank * 3, rank * 3 + 1 + 2 * rank).float().view(-1, 1)).tolist(),
        "sum": dist.all_reduce_sum(rank + 0.5),
        "obj": dist.broadcast_object({"from": rank}),
        "objs": dist.all_gather_objects(rank),
    }
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    c = torch.nn.Parameter(torch.zeros(1))  # no rank's gradient: stays None
    buckets = GradBuckets([a, b, c], dist, bucket_bytes=8)  # a bucket each
    buckets.start()
    buckets.arm()
    loss = (a * (rank + 1)).sum() + (b.sum() if rank == 1 else 0)  # b: one rank's gradient, the sum is that one
    loss.backward()
    buckets.finish()
    got["grads"] = [a.grad.tolist(), b.grad.tolist(), c.grad]
    with dist.main_first():
        Path(out, f"order{rank}").write_text(str(time.time()))
    dist.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_collectives_on_two_processes(tmp_path):
    """Dist's collectives between two real gloo processes: unequal lengths gathered in rank order, sums,
    rank 0's object, gradients summed (None where no rank had one), rank 0 first."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["cat"] == [[0.0], [3.0], [4.0], [5.0]]  # rank 0's one row, then rank 1's three
        assert got["sum"] == 2.0 and got["obj"] == {"from": 0} and got["objs"] == [0, 1]
        assert got["grads"] == [[3.0, 3.0], [1.0, 1.0, 1.0], None]
    assert float((tmp_path / "order0").read_text()) <= float((tmp_path / "order1").read_text())


def test_rank_shares_cover_the_global_micro_batch_in_order():
    """Full global micro-batches split [r*mb, (r+1)*mb); a short last one as evenly as it goes; a rank it
    leaves without a sequence runs a stand-in at zero weight (sekd.training.batches.StandIn)."""
    from sekd.training.batches import StandIn, rank_share

    full = list(range(10, 18))
    assert [rank_share(full, r, 2) for r in (0, 1)] == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert [rank_share([5, 6, 7], r, 2) for r in (0, 1)] == [[5, 6], [7]]
    shares = [rank_share([5], r, 3) for r in range(3)]
    assert shares == [[5], [5], [5]] and [isinstance(s, StandIn) for s in shares] == [False, True, True]
