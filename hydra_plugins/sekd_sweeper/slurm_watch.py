"""The Slurm controller, watched while a sweep submits its cells and waits for them (docs/slurm.md).

A controller that does not answer (stopped, restarting, hung) would leave a sweep failing with submitit's
traceback or waiting for ever on cells that stay queued. While a sweep's batch is launched, a thread asks
the controller (`squeue`) every `SEKD_SLURM_POLL_S` seconds; when it has not answered for
`SEKD_SLURM_TIMEOUT_S` seconds, the thread ends a hung `sbatch` of this process (submitit then fails the
submission) or interrupts the wait, and the sweeper prints one line saying which cells are in which state.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TIMEOUT_ENV, TIMEOUT_S = "SEKD_SLURM_TIMEOUT_S", 120.0  # a controller restart usually takes well under this
POLL_ENV, POLL_S = "SEKD_SLURM_POLL_S", 10.0
WAKE = signal.SIGUSR1  # to the sweep's own main thread only; Slurm's jobs are other processes
# what Slurm's clients print when the controller is down, hung or refusing work for now
SILENT = re.compile(
    r"unable to contact slurm controller|socket timed out|temporarily unable|connection refused|"
    r"zero bytes were transmitted|slurmctld.*(down|not responding)",
    re.IGNORECASE,
)


@dataclass
class Silence:
    """The controller did not answer `command` for `seconds`; `said` is its client's error in a few words."""

    command: str
    seconds: float
    said: str

    def __str__(self) -> str:
        return f"{self.command} after {self.seconds:.0f}s: {self.said}"


def setting(name: str, default: float) -> float:
    """A positive number of seconds from the environment, else the default."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def few_words(text: str) -> str:
    """A Slurm client's error, in one short line: `sbatch: error: X` -> `X`."""
    line = next((ln.strip() for ln in text.splitlines() if SILENT.search(ln)), "") or text.strip()
    line = (line.splitlines() or ["no answer"])[0]
    return re.sub(r"^.*?error:\s*", "", line)[:160]


def ask_controller(timeout: float) -> Optional[str]:
    """None when the controller answers `squeue` within `timeout`; otherwise its error in a few words."""
    try:
        res = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-u", getpass.getuser()], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout:.0f}s"
    except OSError as err:
        return f"squeue: {err.strerror}"
    return None if res.returncode == 0 else few_words(res.stderr or res.stdout)


def submission_silence(err: BaseException, seconds: float) -> Optional[Silence]:
    """The controller's silence that made a submission fail (sbatch's error names it), or None."""
    text = str(err)
    if type(err).__name__ != "FailedJobError" or not SILENT.search(text):
        return None
    return Silence("sbatch", seconds, few_words(text))


def end_children(name: str) -> bool:
    """Kill this process's children called `name` (a hung sbatch); whether there was one."""
    me, found = os.getpid(), False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            comm, fields = rest.rsplit(") ", 1)
        except OSError:
            continue
        if comm == name and int(fields.split()[1]) == me:
            try:
                os.kill(int(pid), signal.SIGKILL)
                found = True
            except ProcessLookupError:
                pass
    return found


class ControllerSilent(BaseException):
    """Raised in the main thread (from a signal handler) to end a launch the controller left waiting; not an
    Exception, so that submitit's `except Exception` around its sacct calls cannot swallow it."""


class ControllerWatch:
    """Asks the controller every `poll_s` while a batch is launched; after `timeout_s` without an answer it
    records the silence and stops the launch: a hung sbatch is killed, a wait for results interrupted."""

    def __init__(self, timeout_s: Optional[float] = None, poll_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s or setting(TIMEOUT_ENV, TIMEOUT_S)
        self.poll_s = min(poll_s or setting(POLL_ENV, POLL_S), self.timeout_s)
        self.silence: Optional[Silence] = None
        self.woken = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.main = threading.get_ident()  # made in the main thread, where submitit waits and signals land

    def __enter__(self) -> "ControllerWatch":
        # a real signal, sent to the main thread: it wakes a sleep or a wait that Python's
        # interrupt_main would not (and that would do nothing where SIGINT is ignored, as under `nohup ... &`)
        self.previous = signal.signal(WAKE, self.wake)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        try:
            self.thread.join()
        finally:  # a wake may cut the first join short; the thread sends nothing once the handler is gone
            self.thread.join()
            signal.signal(WAKE, self.previous)

    def wake(self, signum: int, frame: object) -> None:
        if self.silence is not None and not self.woken:  # once: a second wake must not cut __exit__ short
            self.woken = True
            raise ControllerSilent(str(self.silence))

    def watch(self) -> None:
        answered, worst = time.monotonic(), ""
        while not self.stop.wait(self.poll_s):
            said = ask_controller(max(1.0, self.timeout_s - (time.monotonic() - answered)))
            if self.stop.is_set():
                return
            if said is None:
                answered, worst = time.monotonic(), ""
                continue
            worst = said if not (worst and said.startswith("no answer")) else worst  # Slurm's own words first
            if time.monotonic() - answered >= self.timeout_s:
                self.silence = Silence("squeue", time.monotonic() - answered, worst)
                if end_children("sbatch"):  # a killed sbatch fails the submission by itself
                    return
                while not self.stop.is_set():  # again, until the launch has ended
                    signal.pthread_kill(self.main, WAKE)
                    self.stop.wait(1)
                return
