"""The Tracker (sekd/app/tracking.py): a wandb that fails is one line, once, and the run goes on without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from sekd.app.tracking import Tracker, cause
from tests.disks import mount_tmpfs, remount
from tests.helpers import ROOT

LINE = "the run goes on without it, metrics.jsonl keeps every step"


@pytest.mark.parametrize("calls", ["log, summary, finish", "finish"])
def test_a_killed_wandb_service_is_one_line_once_and_nothing_at_exit(tmp_path, calls):
    """The real service (wandb-core, a child of this process) killed: log, summary and finish go on quietly
    after one line (finish alone too: a fault of wandb at the end, in execute's `finally`, raises nothing to
    hide the run's own line); wandb's own exit hook prints no traceback of the broken connection."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from sekd.app.tracking import Tracker
        from tests.helpers import descendants

        t = Tracker("offline", Path({str(tmp_path)!r}), name="x", config={{}}, project="p")
        t.log({{"a": 1}}, step=1)
        for pid in descendants(os.getpid()):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(-1, 0)
        if {calls!r} != "finish":
            for step in range(2, 5):
                t.log({{"a": step}}, step=step)
            t.summary({{"eval/acc": 1.0}})
        t.finish()
        print("went on")
    """)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "went on", res.stderr[-3000:]
    # the cause is the broken connection, as wandb words it ("Connection lost", "Connection reset by peer")
    assert re.fullmatch(rf"sekd: wandb stopped logging \(Connection [\w ]+\); {LINE}", res.stderr.strip()), res.stderr


def test_a_wandb_that_cannot_start_is_one_line_and_the_run_goes_on(tmp_path, capsys):
    with mount_tmpfs(tmp_path / "disk", "1m") as disk:
        remount(disk, read_only=True)
        try:
            t = Tracker("offline", disk / "run", name="x", config={}, project="p")
            t.log({"a": 1}, step=1)
            t.summary({"eval/acc": 1.0})
            t.finish()
        finally:
            remount(disk, read_only=False)
    err = capsys.readouterr().err
    assert err == f"sekd: wandb did not start (Read-only file system: {disk}/run); {LINE}\n", err
    assert t.run is None


def test_the_cause_is_a_few_words():
    assert cause(OSError(28, "No space left on device", "/x/run.wandb")) == "No space left on device: /x/run.wandb"
    assert cause(RuntimeError("service gone\nmore lines")) == "service gone"
    assert cause(SystemExit(1)) == "1" and cause(ValueError()) == "ValueError"
    assert len(cause(RuntimeError("x" * 500))) == 160
