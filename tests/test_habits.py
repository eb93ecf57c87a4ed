"""The code's habits (CONTRIBUTING.md), checked by parsing: short functions, short module docstrings, and a
lint that types. In the fast tier: nothing here starts a process. (`.ci/run` running `make lint` before
the tests is tests/test_slurm.py's check.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60  # def line to last line, decorators excluded
MAX_MODULE_DOCSTRING_LINES = 12  # opening quotes to closing quotes


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text())) for p in sorted((ROOT / "sekd").rglob("*.py"))]


def test_every_function_in_sekd_is_at_most_60_lines():
    """A function a reader takes in at once; a longer one is split where a reader would (methods and nested
    functions count on their own)."""
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_module_docstrings_in_sekd_are_at_most_12_lines():
    """A module's docstring says what it holds; the method's prose lives in docs/method.md."""
    long = []
    for path, tree in _modules():
        first = tree.body[0] if tree.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            n = (first.end_lineno or first.lineno) - first.lineno + 1
            if n > MAX_MODULE_DOCSTRING_LINES:
                long.append(f"{path} ({n} lines)")
    assert not long, f"module docstrings over {MAX_MODULE_DOCSTRING_LINES} lines:\n" + "\n".join(long)


def test_make_lint_checks_style_format_and_types():
    """`make lint` (what CI runs before the tests) is ruff's check, ruff's format check and mypy, which
    reads the folders it types from pyproject.toml."""
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", make, flags=re.M)
    assert recipe, "Makefile has no lint target"
    lines = recipe.group(1)
    assert "ruff check" in lines and "ruff format --check" in lines and "$(BIN)/mypy" in lines, lines
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(
        r'^\[tool\.mypy\]\n(?:.*\n)*?files = \["sekd", "hydra_plugins", "analysis", "benchmarks", "examples/sekd_lab/sekd_lab"\]',
        pyproject,
        re.M,
    )
