"""selection_trace.jsonl (train.trace_selection_steps): which positions each sequence had selected, with their
scores and weights, per micro-batch of the first N optimizer steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from sekd.core.files import append_lines
from sekd.distributed.process_group import Dist
from sekd.kd.objective import StepOut
from sekd.selection.policies import Draws


def selection_trace_row(
    step: int, sample: str, labels_row: Tensor, u_row: Tensor | None, draws: Draws, b: int
) -> dict[str, Any]:
    valid = (labels_row != -100).nonzero().flatten().tolist()
    k = draws.mask[b]
    return {
        "step": step,
        "sample": sample,
        "valid": valid,
        "scores": [float(u_row[t]) for t in valid] if u_row is not None else [0.0] * len(valid),
        "selected": draws.index[b][k].tolist(),
        "weights": [float(w) for w in draws.weight[b][k]],
    }


class SelectionTrace:
    """selection_trace.jsonl: one row per sequence per micro-step for the first `steps` optimizer steps."""

    def __init__(self, path: Path, steps: int) -> None:
        self.path, self.steps = path, steps

    def rows(self, step: int, samples: list[str], labels: Tensor, out: StepOut) -> list[dict[str, Any]]:
        return [
            selection_trace_row(step, sample, labels[b], out.u[b] if out.u is not None else None, out.draws, b)
            for b, sample in enumerate(samples)
        ]

    def record(self, step: int, samples: list[str], labels: Tensor, out: StepOut, dist: Dist) -> None:
        """The rows of one micro-batch on every rank (a stand-in's `samples` are none), written by rank 0."""
        rows = dist.all_gather_objects(self.rows(step, samples, labels, out))
        dist.main_writes(lambda: self.append([r for part in rows for r in part]))

    def append(self, rows: list[dict[str, Any]]) -> None:
        append_lines(self.path, "".join(json.dumps(r) + "\n" for r in rows))
