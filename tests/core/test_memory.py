"""Which memory ran out, what was asked for and the peak (sekd/core/memory.py): real errors where the machine
makes them (torch's CPU allocator, Python's MemoryError), a card's message as torch writes it."""

from __future__ import annotations

import pytest
import torch

from sekd.core.memory import asked, exhausted, failed_card, gib, peak


def real_host_errors() -> list[BaseException]:
    errors: list[BaseException] = []
    for allocate in (lambda: torch.empty(2**50, dtype=torch.uint8), lambda: bytearray(2**60)):
        try:
            allocate()
        except (RuntimeError, MemoryError) as err:
            errors.append(err)
    return errors


def test_a_card_and_the_host_are_told_apart_from_other_errors():
    card = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity")
    assert exhausted(card) == "card" and exhausted(torch.cuda.OutOfMemoryError("x")) == "card"
    cpu, python = real_host_errors()
    assert type(cpu) is RuntimeError and type(python) is MemoryError
    assert exhausted(cpu) == "host" and exhausted(python) == "host"
    assert exhausted(RuntimeError("shape mismatch")) is None and exhausted(ValueError("x")) is None


def test_what_was_asked_for_reads_torchs_messages():
    assert asked(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0")) == (
        "tried to allocate 20.00 MiB"
    )
    cpu, python = real_host_errors()
    assert asked(cpu) == "tried to allocate 1048576.00 GiB"
    assert asked(python) == ""


def test_the_card_that_failed_is_the_one_torch_names():
    teachers = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 79.19 GiB"
    )
    assert failed_card(teachers, torch.device("cuda", 0)) == torch.device("cuda", 1)
    assert failed_card(torch.OutOfMemoryError("CUDA out of memory."), None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a card's peak needs a card")
def test_a_cards_peak_is_its_allocated_peak_of_its_total():
    device = torch.device("cuda", 0)
    held = torch.empty(2**28, dtype=torch.uint8, device=device)
    line = peak(device, "card")
    assert line.startswith("peak ") and " allocated of " in line and line.endswith(" GiB")
    del held


def test_the_hosts_peak_is_the_resident_peak():
    assert peak(torch.device("cpu"), "host").startswith("peak RSS ")
    assert peak(None, "card").startswith("peak RSS ")  # no card here: the process's own peak
    assert peak(torch.device("cpu"), "host").endswith("iB of host memory")


def test_amounts_read_in_mib_below_a_gib():
    assert (gib(2**20 * 650), gib(2**30 * 1.5), gib(2**50)) == ("650 MiB", "1.50 GiB", "1048576.00 GiB")
