"""Which sequences each micro-batch holds: seeded epochs from the saved position on and, with several ranks,
each rank's contiguous share of a global micro-batch, so any world size sees the one-process order
(docs/method.md §9)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from sekd.data.packing import PackedData
    from sekd.training.checkpoint import Progress


class StandIn(list[int]):
    """A rank's share of a short last global micro-batch that left it no sequence: one sequence of the
    batch run again at zero weight, so the rank still takes part in every collective; it counts nowhere."""


def rank_share(idx: list[int], rank: int, world_size: int) -> list[int]:
    """Rank r's contiguous slice of a global micro-batch: [r*mb, (r+1)*mb) of a full one; a short last
    one is split as evenly as it goes (sizes differ by at most one), in rank order."""
    base, extra = divmod(len(idx), world_size)
    start = rank * base + min(rank, extra)
    share = idx[start : start + base + (rank < extra)]
    return share if share else StandIn(idx[:1])


def micro_batches(
    data: PackedData, mb: int, seed: int, prog: Progress, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Seeded epochs of micro-batches, from the saved position on; advances `prog` as it goes. With
    several ranks: global micro-batches of world_size x mb, of which each rank yields its share."""
    from sekd.data.dataset import batches

    while True:
        for idx in batches(data, micro_batch_size=mb * world_size, seed=seed, epoch=prog.epoch, start=prog.offset):
            prog.offset += len(idx)
            yield rank_share(list(idx), rank, world_size)
        prog.epoch, prog.offset = prog.epoch + 1, 0
