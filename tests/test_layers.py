"""The import graph is a ladder (docs/architecture.md): every module of sekd/ and hydra_plugins/ has one
place on it, and imports only from its own unit (a package or a module) or from a lower rung. An
import up the ladder, or sideways into another unit of the same rung, fails here, naming the edge.

Every import counts, including those inside functions (the lazy ones that keep start-up fast).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (layer, rungs from the bottom up); a rung lists sibling units. A unit ending in ".*" is a package and
# everything under it; any other unit is exactly that module.
LADDER: list[tuple[str, list[list[str]]]] = [
    (
        "base",
        [
            ["sekd", "sekd.core.*"],
            ["sekd.config.*", "sekd.distributed.*"],
        ],
    ),
    (
        "math",
        [
            ["sekd.selection.*"],
            ["sekd.kd.*"],
        ],
    ),
    (
        "data and models",
        [
            ["sekd.data.*"],
            ["sekd.embedded.*"],
            ["sekd.models.*", "sekd.evaluation.*"],
            ["sekd.plugins"],
        ],
    ),
    (
        "services",
        [
            ["sekd.stores", "sekd.stores.runs", "sekd.stores.sample_importance", "sekd.stores.teacher_cache.*"],
        ],
    ),
    (
        "training",
        [
            ["sekd.training.*"],
        ],
    ),
    (
        "app",
        [
            ["sekd.app.*"],
        ],
    ),
    (
        "tools",
        [
            ["sekd.report.*", "sekd.testing.*"],
            ["sekd.cli.*", "sekd.train", "hydra_plugins.*"],
        ],
    ),
]
# Layer 1 is tensors in, tensors out: no files, no locks, no progress bars.
NO_IO = ("os", "pathlib", "shutil", "tempfile", "filelock", "tqdm", "sekd.core.files", "sekd.core.artifacts")


def rungs() -> dict[str, tuple[int, str]]:
    """unit -> (rung index from the bottom, layer name)."""
    out, i = {}, 0
    for layer, steps in LADDER:
        for units in steps:
            for unit in units:
                out[unit] = (i, layer)
            i += 1
    return out


def unit_of(module: str, units: dict[str, tuple[int, str]]) -> str | None:
    """The most specific unit holding `module`, or None when the ladder has no place for it."""
    best = None
    for unit in units:
        package = unit.endswith(".*")
        name = unit[:-2] if package else unit
        if module == name or (package and module.startswith(name + ".")):
            if best is None or len(name) > len(best.removesuffix(".*")):
                best = unit
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("sekd", "hydra_plugins") for p in sorted((ROOT / top).rglob("*.py"))}


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, str, str]]:
    """(imported module, name imported from it or "", name bound here) for one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, "", a.asname or a.name.split(".")[0]) for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append((sub, "", a.asname or a.name) if sub in known else (base, a.name, a.asname or a.name))
    return out


def imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import of `source` anywhere in it (in functions too), relative
    ones resolved; `from pkg import name` counts as pkg.name when that is a module of `known`."""
    found = {
        (target, node.lineno)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for target, _, _ in _targets(node, module, is_package, known)
    }
    return sorted(found, key=lambda t: (t[1], t[0]))


def private_uses(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, str, int]]:
    """(module, _name, line) for each private name of another module this one imports or reads
    (`from m import _f`, or `m._f` through a module it imported)."""
    tree = ast.parse(source)
    aliases, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, name, bound in _targets(node, module, is_package, known):
                if name.startswith("_") and not name.startswith("__"):
                    out.append((target, name, node.lineno))
                elif not name:
                    aliases[bound] = target
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append((aliases[node.value.id], node.attr, node.lineno))
    return out


def ours(name: str) -> bool:
    return name.split(".")[0] in ("sekd", "hydra_plugins")


def violations(sources: dict[str, Path], known: set[str]) -> list[str]:
    """One line per import (of a module in `sources`, by name) that looks up or sideways on the ladder."""
    units, out = rungs(), []
    for module, path in sources.items():
        src_unit = unit_of(module, units)
        src_rung, src_layer = units[src_unit]
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for target, line in imports(path.read_text(), module, path.name == "__init__.py", known):
            dst_unit = unit_of(target, units) if ours(target) else None
            if dst_unit is None or dst_unit == src_unit:
                continue  # not ours, or within one unit (an unplaced target fails the test below)
            dst_rung, dst_layer = units[dst_unit]
            if dst_rung >= src_rung:
                how = "up" if dst_rung > src_rung else "sideways"
                out.append(
                    f"{module} -> {target} ({where}:{line}): {how}, from {src_unit} ({src_layer}) "
                    f"to {dst_unit} ({dst_layer})"
                )
    return out


def test_every_module_has_a_place_on_the_ladder():
    units = rungs()
    unplaced = [m for m in modules() if unit_of(m, units) is None]
    assert not unplaced, f"add these modules to LADDER here and to docs/architecture.md: {unplaced}"


def test_imports_only_look_down():
    found = modules()
    bad = violations(found, set(found))
    assert not bad, "imports against the ladder (docs/architecture.md):\n" + "\n".join(bad)


def test_the_math_layer_does_no_io():
    units, found = rungs(), modules()
    math = [m for m in found if units[unit_of(m, units)][1] == "math"]
    bad = [
        f"{m} imports {t} (line {line})"
        for m in math
        for t, line in imports(found[m].read_text(), m, found[m].name == "__init__.py", set(found))
        if any(t == x or t.startswith(x + ".") for x in NO_IO)
    ]
    assert math and not bad, "\n".join(bad)


def test_no_module_uses_another_units_private_names():
    units, found = rungs(), modules()
    bad = [
        f"{m} uses {t}.{name} (line {line})"
        for m in found
        for t, name, line in private_uses(found[m].read_text(), m, found[m].name == "__init__.py", set(found))
        if ours(t) and unit_of(t, units) != unit_of(m, units)
    ]
    assert not bad, "a private name is its unit's own; make it public or move the caller:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, module, expect",
    [
        (
            "def f():\n    from sekd.training.loop import Trainer\n",
            "sekd.data.dataset",
            ["sekd.data.dataset -> sekd.training.loop"],
        ),
        ("from ..stores import runs\n", "sekd.selection.samples", ["sekd.selection.samples -> sekd.stores.runs"]),
        (
            "import sekd.stores.sample_importance\n",
            "sekd.stores.runs",
            ["sekd.stores.runs -> sekd.stores.sample_importance"],
        ),  # a sibling of the same rung
        ("from sekd.core.tensors import IGNORE\nfrom . import packing\nimport torch\n", "sekd.data.dataset", []),
    ],
)
def test_the_check_sees_lazy_relative_and_sideways_imports(tmp_path, source, module, expect):
    path = tmp_path / "mod.py"
    path.write_text(source)
    got = [line.split(" (")[0] for line in violations({module: path}, set(modules()))]
    assert got == expect
