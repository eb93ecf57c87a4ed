"""sekd: a benchmark harness for selective knowledge distillation of LLMs.

The public API (docs/api.md): the decorators that register a piece of each kind — the built-in pieces are
registered through the same ones —, the helpers their options dataclasses check ranges with, the types a
piece returns, and the loader of results for notebooks. `sekd.testing` checks a piece as the built-ins are
checked. Each name is imported on first use: `sekd-train --version` loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {  # name -> the module that defines it
    "signal": "sekd.selection.signals",
    "combined_signal": "sekd.selection.signals",
    "Signal": "sekd.selection.signals",
    "policy": "sekd.selection.policies",
    "Draws": "sekd.selection.policies",
    "criterion": "sekd.selection.criteria",
    "Selected": "sekd.selection.criteria",
    "class_sampler": "sekd.selection.classes",
    "SparseTarget": "sekd.selection.classes",
    "sample_selector": "sekd.selection.samples",
    "data_source": "sekd.data.sources",
    "NoOptions": "sekd.core.registry",
    "OptionError": "sekd.core.registry",
    "at_least": "sekd.core.registry",
    "positive": "sekd.core.registry",
    "in_range": "sekd.core.registry",
    "RowKeys": "sekd.core.rng",
    "load_results": "sekd.report.loading",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sekd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
