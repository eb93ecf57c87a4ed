"""Out of memory: which memory ran out (a card's or the host's), what was asked for, and the run's peak.

A card's torch.OutOfMemoryError, Python's MemoryError and torch's CPU allocator error ("can't allocate
memory") are faults of the machine, not bugs: the trainer (sekd/training/trainer.py) and the app
(sekd/app/faults.py) turn them into one line naming the peak and what to do.
"""

from __future__ import annotations

import re
import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GIB = 2**30


def exhausted(err: BaseException) -> str | None:
    """Which memory `err` says ran out: "card" (CUDA), "host" (RAM), or None for any other error."""
    loaded = sys.modules.get("torch")  # not imported: not torch's error (and no torch to load on the way out)
    if loaded is not None and isinstance(err, loaded.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return "card"
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        return "host"
    return None


def asked(err: BaseException) -> str:
    """What the failed allocation asked for, as torch's message says it ("" where it does not)."""
    text = str(err)
    card = re.search(r"Tried to allocate (\d+(?:\.\d+)? [KMGT]?i?B)", text)
    if card:
        return f"tried to allocate {card.group(1)}"
    host = re.search(r"you tried to allocate (\d+) bytes", text)
    return f"tried to allocate {gib(int(host.group(1)))}" if host else ""


def failed_card(err: BaseException, default: torch.device | None) -> torch.device | None:
    """The card torch's message names ("GPU 1 has a total capacity ..."): a placed teacher's card
    (model.teacher_device) is not the student's; `default` where the message names none."""
    import torch

    card = re.search(r"GPU (\d+) has a total capacity", str(err))
    return torch.device("cuda", int(card.group(1))) if card else default


def peak(device: torch.device | None, kind: str) -> str:
    """The run's peak: a card's most allocated (of its total), or the process's resident peak (host RAM)."""
    import torch

    if kind == "card" and device is not None and device.type == "cuda" and torch.cuda.is_available():
        held = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        return f"peak {gib(held)} allocated of {gib(total)}"  # the line names the card itself
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return f"peak RSS {gib(rss)} of host memory"


def gib(n: float) -> str:
    """An amount of memory as people read it: MiB below a GiB, GiB with two decimals above."""
    return f"{n / 2**20:.0f} MiB" if n < GIB else f"{n / GIB:.2f} GiB"
