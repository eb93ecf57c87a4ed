"""Where a `sekd-train` process spends its time before (and around) training: wall seconds per phase.

    python benchmarks/startup.py                      # every case, 3 rounds, the tiny pair built once in a temp folder
    python benchmarks/startup.py --rounds 5 --cases run,skipped --json startup.json

Each case is the real CLI in a fresh process (as the end-to-end tests start it), with tests/helpers.py's TINY
overrides and one torch thread; the child wraps the app's phases with a timer (nothing else changes). Cases:
  version    `--version`: the interpreter and `import sekd.train`
  refused    a bad value the command-line check refuses (train.lr=-1)
  skipped    a finished run started again ("already done; skipping"): composing and checks only
  run        a fresh full_kd run of 3 steps: compose, train, score (eval.limit=24), record
  plan       `--plan`: the run's memory per device, nothing built or loaded (sekd/app/plan.py)
The table gives each phase's median over the rounds (wall seconds); `total` is the process's wall time seen from
outside, `cpu` its user + system CPU time (steadier on a shared machine), from its start to its exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "model=tiny data.seq_len=64 train.micro_batch_size=4 train.grad_accum=2 train.threads=1 logging=disabled"
CASES = {
    "version": ["--version"],
    "refused": [*TINY.split(), "train.lr=-1"],
    "skipped": [*TINY.split(), "experiment=full_kd", "train.steps=3", "eval.limit=24"],
    "run": [*TINY.split(), "experiment=full_kd", "train.steps=3", "eval.limit=24"],
    "plan": [*TINY.split(), "experiment=full_kd", "--plan"],
}
# (label, module, attribute): the phases the child times, in the order a run meets them
PHASES = [
    ("check_command_line", "sekd.app.checks", "check_command_line"),
    ("hydra_app", "sekd.train", "app"),
    ("quiet_libraries", "sekd.app", "quiet_libraries"),
    ("compose", "sekd.app", "compose"),
    ("preflight", "sekd.app.preflight", "preflight"),
    ("resolve_pair", "sekd.app.compose", "resolve"),
    ("train", "sekd.app", "train"),
    ("score", "sekd.app", "score"),
]


def child(out: str, argv: list[str]) -> None:
    """Run the CLI in this process with each phase wrapped; write {phase: seconds} to `out` at exit."""
    import atexit
    import importlib

    spent: dict[str, float] = {}
    t0 = time.perf_counter()
    import sekd.train

    spent["import sekd.train"] = time.perf_counter() - t0
    for label, module, name in PHASES:
        mod = importlib.import_module(module) if module != "sekd.app.compose" else sys.modules[module]
        setattr(mod, name, timed(getattr(mod, name), label, spent))
    atexit.register(lambda: Path(out).write_text(json.dumps(spent)))
    sys.argv = ["sekd.train", *argv]
    sekd.train.main()


def timed(fn, label: str, spent: dict[str, float]):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

    return wrapper


def measure(args: list[str], env: dict[str, str]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t, cpu = time.perf_counter(), children_cpu()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", out, "--", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    total, cpu = time.perf_counter() - t, children_cpu() - cpu
    if proc.returncode not in (0, 2):
        sys.exit(f"the CLI failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases = json.loads(Path(out).read_text() or "{}") if Path(out).stat().st_size else {}
    os.unlink(out)
    return {"total": total, "cpu": cpu, **phases}


def children_cpu() -> float:
    """User + system CPU seconds of the finished child processes: steadier than wall time on a shared machine."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.argv)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        **{k: "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")},
        "WANDB_MODE": "offline",
    }
    work = Path(tempfile.mkdtemp(prefix="sekd-startup-"))
    paths = [f"paths.cache={work / 'cache'}"]
    try:
        measure([*CASES["run"], f"paths.root={work / 'built'}", *paths], env)  # builds the pair, and one run
        rows: dict[str, list[dict[str, float]]] = {c: [] for c in a.cases.split(",")}
        for r in range(a.rounds):  # interleaved: a slow spell of the machine hits every case alike
            for case in rows:
                root = work / "built" if case == "skipped" else work / f"{case}-{r}"
                rows[case].append(measure([*CASES[case], f"paths.root={root}", *paths], env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table(rows, a.rounds)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


def table(rows: dict[str, list[dict[str, float]]], rounds: int) -> None:
    labels = ["total", "cpu", "import sekd.train"] + [p[0] for p in PHASES]
    print(f"median seconds over {rounds} rounds (one process each; phases nest: compose holds preflight, resolve_pair)")
    print("| case | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for case, runs in rows.items():
        cells = [statistics.median([r.get(k, 0.0) for r in runs]) for k in labels]
        print(f"| {case} | " + " | ".join(f"{c:.2f}" if c else "-" for c in cells) + " |")


if __name__ == "__main__":
    main()
