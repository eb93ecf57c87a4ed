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


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts a process, itself, through a helper or through one of its fixtures."""
    for item in items:
        module = Path(str(item.fspath)).stem
        name = getattr(item, "originalname", item.name)
        if _spawns(module, name) or any(_spawns(module, f) for f in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


# ---- `make test`: two pytest-xdist workers (-n 2 --dist loadgroup) ---------------------------------------
#
# Some tests must share a worker, and the scheduler below decides it from the nodeids alone (the controller
# collects nothing), reading the test sources as the marking above does. pytest-xdist's own loadgroup reads
# xdist_group marks by appending them to the nodeids, which pytest 9.2's structured nodeids ignore
# (pytest-dev/pytest-xdist#1386): --dist loadgroup gets this scheduler instead, which also honours the marks.


@functools.lru_cache(maxsize=None)
def _module_info(path: str) -> tuple[dict[str, str], dict[str, set[str]], set[str], set[str]]:
    """For the test module at `path` (rootdir-relative): function -> the xdist_group it names; function -> its
    parameters (a test's or a fixture's fixtures); its module-scoped fixtures; its functions marked slow."""
    groups: dict[str, str] = {}
    params: dict[str, set[str]] = {}
    module_fixtures: set[str] = set()
    slow: set[str] = set()
    file = TESTS.parent / path
    tree = ast.parse(file.read_text()) if file.suffix == ".py" and file.exists() else ast.Module(body=[])
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params[node.name] = {a.arg for a in [*node.args.args, *node.args.kwonlyargs]}
        for d in node.decorator_list:
            call = d if isinstance(d, ast.Call) else None
            func = call.func if call else d
            attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if attr == "xdist_group" and call and call.args and isinstance(call.args[0], ast.Constant):
                groups[node.name] = str(call.args[0].value)
            elif attr == "fixture" and call:
                if any(k.arg == "scope" and getattr(k.value, "value", None) == "module" for k in call.keywords):
                    module_fixtures.add(node.name)
            elif attr == "slow":
                slow.add(node.name)
    return groups, params, module_fixtures, slow


def _test_of(nodeid: str) -> tuple[str, str]:
    """(rootdir-relative path, test function name) of a nodeid (an xdist "@group" suffix dropped)."""
    if nodeid.rfind("@") > nodeid.rfind("]"):
        nodeid = nodeid[: nodeid.rfind("@")]
    path, _, rest = nodeid.partition("::")
    return path, rest.split("[", 1)[0].split("::")[-1]


def _fixtures_of(path: str, name: str) -> set[str]:
    """The fixtures `name` asks for, through the fixtures of its own module too (those of conftest.py files
    count by name only)."""
    params = _module_info(path)[1]
    seen, todo = set(), [name]
    while todo:
        for p in params.get(todo.pop(), set()) - seen:
            seen.add(p)
            todo.append(p)
    return seen


def xdist_group(nodeid: str) -> str:
    """The work unit a test goes in, whole, to one worker:

    - the group its xdist_group mark names (tests that read runs another builds once: tests/helpers.built_once);
    - "slurm": tests/test_slurm.py, and any test asking for a fixture named `cluster` (tests/test_slurm_faults.py):
      their session's one-node cluster (`slurm_cluster`) is started once and stopped by that worker (two workers
      would start and stop it under each other);
    - its module: a test using a module-scoped fixture of its module (a run, a built cache: split over two
      workers, each would build it, module fixtures being per process);
    - else the test alone."""
    path, name = _test_of(nodeid)
    groups, _, module_fixtures, _ = _module_info(path)
    if name in groups:
        return groups[name]
    if path == "tests/test_slurm.py" or "cluster" in _fixtures_of(path, name):
        return "slurm"
    if _fixtures_of(path, name) & module_fixtures:
        return path
    return nodeid


def _heavy(nodeid: str) -> bool:
    """Whether a test is one `make test-fast` leaves out: it starts a process (as marked above), or is marked slow."""
    path, name = _test_of(nodeid)
    stem = Path(path).stem
    return (
        name in _module_info(path)[3] or _spawns(stem, name) or any(_spawns(stem, f) for f in _fixtures_of(path, name))
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's loadscope with xdist_group()'s work units, the heavy ones (starting processes, slow) handed out
        first and the largest of them first: the many short tests fill the end, and no long one starts last."""

        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the first call: the queue of work units is complete
                self.ordered = True
                heavy = {scope: any(_heavy(n) for n in unit) for scope, unit in self.workqueue.items()}
                order = sorted(self.workqueue, key=lambda scope: (not heavy[scope], -len(self.workqueue[scope])))
                self.workqueue = type(self.workqueue)((scope, self.workqueue[scope]) for scope in order)
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The local Slurm cluster, started once for tests/test_slurm.py and tests/test_slurm_faults.py (their
    `cluster` fixtures put both in the slurm unit, one worker) and stopped at the session's end."""
    from tests.test_slurm import started_cluster

    yield from started_cluster(tmp_path_factory)
