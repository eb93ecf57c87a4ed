"""train.profile_steps: torch.profiler over a few optimizer steps, written as a Chrome trace per rank."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after one warm-up step (the first step pays for allocations
    and kernel selection), CPU and CUDA activity with shapes and memory; the trace goes to
    <run>/profile-rank<r>.json (chrome://tracing, Perfetto) once the last traced step ends."""

    def __init__(self, steps: int, folder: Path | None, rank: int) -> None:
        self.steps, self.folder, self.rank, self.done = steps, folder, rank, 0
        self.prof: Any = None  # torch.profiler.profile while tracing

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not self.steps or self.folder is None or self.done > self.steps:
            yield
            return
        if self.done == 1:  # after the warm-up step
            from torch.profiler import ProfilerActivity, profile

            kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=kinds, record_shapes=True, profile_memory=True)
            self.prof.__enter__()
        yield
        self.done += 1
        if self.done == self.steps + 1:
            self.close()

    def close(self) -> None:
        """Stop tracing and write what was traced (the run may end before its last traced step)."""
        if self.prof is None or self.folder is None:
            return
        prof, self.prof, self.done = self.prof, None, self.steps + 1
        prof.__exit__(None, None, None)
        from sekd.core.files import atomic_path

        with atomic_path(Path(self.folder) / f"profile-rank{self.rank}.json") as tmp:
            prof.export_chrome_trace(str(tmp))
