"""sekd.testing: the conformance kit. Check a piece of your own the way sekd's built-in pieces are checked:

    import my_lab.pieces                      # registers them
    from sekd.testing import check_signal
    check_signal("margin")                    # AssertionError naming what broke

`check_signal(name)`, `check_policy(name, options)`, `check_criterion(name, options)`,
`check_class_sampler(name, options)`, `check_piece(kind, name, options)`; `pieces_of(module)` lists a
module's pieces; the flow helpers (`heads`, `batch`, `both`, `assert_same`, `cached_targets`) compare the
dense and chunked flows. Nothing here imports pytest (the fixtures: sekd.testing.pytest_plugin).
"""

from sekd.testing.contracts import (
    check_class_sampler,
    check_criterion,
    check_piece,
    check_policy,
    check_ranks,
    check_ranks_of,
    check_signal,
    pieces_of,
)
from sekd.testing.flows import assert_same, batch, both, cached_targets, heads

__all__ = [
    "assert_same",
    "batch",
    "both",
    "cached_targets",
    "check_class_sampler",
    "check_criterion",
    "check_piece",
    "check_policy",
    "check_ranks",
    "check_ranks_of",
    "check_signal",
    "heads",
    "pieces_of",
]
