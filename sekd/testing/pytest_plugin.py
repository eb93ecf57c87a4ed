"""sekd's conformance kit as a pytest plugin (`pytest -p sekd.testing.pytest_plugin`, or installed through
the `pytest11` entry point): the fixture `sekd_check` is `sekd.testing.check_piece`, and
`conformance_tests(module)` makes one test per piece a module registers. A user's test file:

    import my_lab.pieces
    from sekd.testing.pytest_plugin import conformance_tests

    test_my_pieces = conformance_tests("my_lab.pieces")
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

# sekd.testing (torch, the registries) is imported when a test asks for it, not when pytest loads the plugin


@pytest.fixture
def sekd_check() -> Callable[..., None]:
    """check_piece(kind, name, options=None): the conformance check of one registered piece."""
    from sekd.testing.contracts import check_piece

    return check_piece


def conformance_tests(module: str, **options: Any) -> Callable[..., None]:
    """A test function parametrized over every piece `module` registers (options: {name: {...}})."""
    from sekd.testing.contracts import check_piece, pieces_of

    pieces = list(pieces_of(module))
    if not pieces:
        raise ValueError(f"sekd.testing: module {module!r} registers no signal, policy, criterion or class sampler")

    @pytest.mark.parametrize("kind,name", pieces, ids=[f"{k}-{n}" for k, n in pieces])
    def test_conformance(kind: str, name: str) -> None:
        check_piece(kind, name, options.get(name))

    return test_conformance
