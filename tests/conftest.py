"""Every test runs offline: set before any Hugging Face package is imported."""

import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter):
    """Tests skipped for want of Slurm are repeated last, in a banner: a green run that did not test the
    Slurm path must say so (tests/test_slurm.py)."""
    reasons = sorted(
        {
            str(r.longrepr[2])
            for r in terminalreporter.stats.get("skipped", [])
            if isinstance(r.longrepr, tuple) and "SLURM TESTS NOT RUN" in str(r.longrepr[2])
        }
    )
    for reason in reasons:
        terminalreporter.write_sep("!", "Slurm path untested", yellow=True, bold=True)
        terminalreporter.write_line(reason.removeprefix("Skipped: "), yellow=True, bold=True)


# ---- the fast tier: `make test-fast` runs every test that starts no process -------------------------

import ast  # noqa: E402
import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
# what starts a process: the CLI, torchrun or a Slurm job through subprocess, a notebook's kernel, a fork
SPAWNS = {"subprocess", "Popen", "NotebookClient", "ExecutePreprocessor", "fork", "spawn", "start_processes"}


@functools.lru_cache(maxsize=1)
def _functions() -> dict[tuple[str, str], set[str]]:
    """(module stem, function name) -> the names its body uses, for every function defined in tests/
    (tests, helpers and fixtures alike, nested ones under their own name)."""
    out: dict[tuple[str, str], set[str]] = {}
    for path in TESTS.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                out.setdefault((path.stem, node.name), set()).update(used)
    return out


@functools.lru_cache(maxsize=1)
def _by_name() -> dict[str, list[tuple[str, str]]]:
    """Function name -> its (module stem, name) keys in _functions(), in their order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for key in _functions():
        out.setdefault(key[1], []).append(key)
    return out


@functools.lru_cache(maxsize=None)
def _spawns(module: str, name: str, seen: frozenset = frozenset()) -> bool:
    """Whether the function `name` (resolved in `module` first, else in any test module) starts a process,
    itself or through a function of tests/ it uses."""
    funcs, by_name = _functions(), _by_name()
    keys = [(module, name)] if (module, name) in funcs else by_name.get(name, [])
    for key in keys:
        if key in seen:
            continue
        used = funcs[key]
        if used & SPAWNS or any(_spawns(key[0], u, seen | {key}) for u in used if u in by_name):
            return True
    return False


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "e2e: starts a process (the CLI, torchrun, a Slurm job, a notebook kernel); `make test-fast` leaves these out",
    )
    config.addinivalue_line(
        "markers",
        "slow: in-process but seconds long (every sweep cell, every config hash, "
        "lm-eval's task index); `make test-fast` leaves these out",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (its --dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """Mark every test that starts a process, itself, through a helper or through one of its fixtures; and keep
    together, on one pytest-xdist worker (`make test` runs `-n 2 --dist loadgroup`), what must not be split."""
    for item in items:
        module = Path(str(item.fspath)).stem
        name = getattr(item, "originalname", item.name)
        if _spawns(module, name) or any(_spawns(module, f) for f in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        group = xdist_group(item)
        if group and not any(item.iter_markers("xdist_group")):  # a test's own group comes first
            item.add_marker(pytest.mark.xdist_group(group))


def xdist_group(item) -> str | None:
    """The pytest-xdist group a test joins unless it names its own:

    - "slurm": every test of tests/test_slurm.py and every test using its cluster, so that one worker starts,
      uses and stops the one-node cluster (two would start and stop it under each other);
    - "<module>": a module's tests that share a module-scoped fixture (a run, a built cache): split over two
      workers, each would build it (module fixtures are per process)."""
    fixtures = getattr(item, "_fixtureinfo", None)
    defs = fixtures.name2fixturedefs if fixtures else {}
    if Path(str(item.fspath)).name == "test_slurm.py" or "cluster" in defs:
        return "slurm"
    if any(d.scope == "module" for ds in defs.values() for d in ds):
        return item.nodeid.split("::")[0]
    return None
