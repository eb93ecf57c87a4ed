"""The project explains itself: docs/method.md covers every registered piece, every `docs/method.md §N`
citation points at a section that exists, and nothing outside tests/ sends a user to files they do not
have (the spec the project was built from, a sibling `../shared` folder, a path of one machine)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sekd.selection.classes import CLASSES
from sekd.selection.criteria import CRITERIA
from sekd.selection.policies import POLICIES
from sekd.selection.samples import SAMPLE_SELECTORS
from sekd.selection.signals import SIGNALS

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SECTIONS = (
    "Notation",
    "The selective objective",
    "Alignment criteria",
    "Position axis: importance signals",
    "Position axis: selection policies",
    "Class axis",
    "Sample axis",
    "Named methods",
    "Efficiency features",
    "Regimes",
    "Evaluation protocol",
    "Paper hyperparameters",
    "Defects of the paper's public code that sekd does not copy",
    "Where the presets follow the paper's code",
    "Other places sekd knowingly differs",
)
# What a user of the project does not have: the spec, the folder it sat in, one machine's paths.
UNFOLLOWABLE = re.compile(r"SPEC §|SPEC\.md|\.\./shared|(?<![\w.~-])/(?:work|root|home)/")
SKIP_DIRS = {".git", ".venv", "outputs", ".sekd_cache", "__pycache__", "node_modules"}
# `docs/method.md §2`, `docs/method.md §7-§9, §13`, `docs/method.md §1 valid(t)`
CITATION = re.compile(r"docs/method\.md((?:\s*(?:[,\-–]|and)?\s*§\d+)+)")


def project_files() -> list[Path]:
    """Files of the project (tracked or new, not ignored); outside a git checkout, the tree minus build output."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        paths = [ROOT / p for p in out.split("\0") if p]
    else:
        paths = [
            p
            for p in ROOT.rglob("*")
            if not SKIP_DIRS & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        ]
    return sorted(p for p in paths if p.is_file())


def text_of(path: Path) -> str | None:
    """The file's text, or None for binary files (images, archives)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def sections(md: str) -> dict[int, str]:
    """`## N. Title` headings -> {N: Title}."""
    return {int(n): title.strip() for n, title in re.findall(r"^## (\d+)\. (.+)$", md, flags=re.M)}


@pytest.fixture(scope="module")
def method() -> str:
    assert METHOD.is_file(), "docs/method.md is missing"
    return METHOD.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    out = {}
    for path in project_files():
        text = text_of(path)
        if text is not None:
            out[path.relative_to(ROOT).as_posix()] = text
    return out


def test_method_has_the_numbered_sections_the_code_cites(method):
    assert sections(method) == dict(enumerate(SECTIONS, 1))


def test_no_file_outside_tests_sends_the_user_to_files_they_do_not_have(texts):
    bad = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for name, text in texts.items()
        if not name.startswith("tests/")
        for m in UNFOLLOWABLE.finditer(text)
    ]
    assert not bad, "cite docs/method.md §N instead of:\n" + "\n".join(bad)


def test_the_scan_sees_the_project_and_catches_each_kind():
    names = {p.relative_to(ROOT).as_posix() for p in project_files()}
    assert {"README.md", "sekd/app/checks.py", "conf/config.yaml", "docs/method.md"} <= names
    for planted in ("see SPEC §4", "python -m sekd.report.tables ../shared", "cd /work/main", "/home/me/x"):
        assert UNFOLLOWABLE.search(planted), planted
    for fine in ("docs/method.md §4", "LATEX_SPECIAL", "paths.root=/tmp/x", "sekd/work/x"):
        assert not UNFOLLOWABLE.search(fine), fine


def test_every_citation_names_a_section_that_exists(texts, method):
    known = sections(method)
    cited = [
        (name, int(n))
        for name, text in texts.items()
        for m in CITATION.finditer(text)
        for n in re.findall(r"§(\d+)", m.group(1))
    ]
    assert len(cited) > 20, "the citation pattern found almost nothing: is it still right?"
    bad = sorted({f"{name}: §{n}" for name, n in cited if n not in known})
    assert not bad, "docs/method.md has no such section:\n" + "\n".join(bad)


def test_the_citation_pattern_reads_ranges_and_lists():
    found = [
        re.findall(r"§(\d+)", m.group(1))
        for m in CITATION.finditer("(docs/method.md §7-§9, §13) and docs/method.md §1 valid(t), docs/method.md §10")
    ]
    assert found == [["7", "9", "13"], ["1"], ["10"]]


def test_method_cross_references_exist(method):
    known = sections(method)
    bad = sorted({int(n) for n in re.findall(r"§(\d+)", method)} - set(known))
    assert not bad, f"docs/method.md refers to missing sections {bad}"


REGISTRIES = {
    "signal": SIGNALS,
    "policy": POLICIES,
    "class selector": CLASSES,
    "sample selector": SAMPLE_SELECTORS,
    "criterion": CRITERIA,
}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registered_name_and_option_is_documented(kind, method):
    reg = REGISTRIES[kind]
    names = list(reg.names()) + (["full"] if reg is CLASSES else [])
    missing = [n for n in names if f"`{n}`" not in method]
    assert not missing, f"docs/method.md does not document {kind} {missing}"
    if reg in (POLICIES, CLASSES, CRITERIA):  # their keyword options are config keys (position.options.*, ...)
        undocumented = [f"{n}.{o}" for n in reg.names() for o in reg.options(n) if o != "k" and f"`{o}`" not in method]
        assert not undocumented, f"docs/method.md does not document {kind} options {undocumented}"


@pytest.mark.parametrize("group", ["position", "classes", "samples", "criterion", "regime", "eval"])
def test_every_config_option_of_the_method_groups_is_documented(group, method):
    options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    assert options
    # eval's profile-specific aliases (embedded_task, paper_task) stand for `task` on each profile
    missing = [
        o for o in options if f"`{o}`" not in method and f"`{group}={o}`" not in method and not o.endswith("_task")
    ]
    assert not missing, f"docs/method.md does not mention {group} options {missing}"


def test_readme_and_docs_link_only_to_files_that_exist(texts):
    assert "docs/method.md" in texts["README.md"] and "docs/slurm.md" in texts["README.md"]
    bad = []
    for name in ["README.md", *[n for n in texts if n.startswith("docs/") and n.endswith(".md")]]:
        for target in re.findall(r"\]\(([^)#\s]+)", texts[name]):
            if "://" not in target and not (ROOT / name).parent.joinpath(target).exists():
                bad.append(f"{name} -> {target}")
    assert not bad, "links to missing files:\n" + "\n".join(bad)


RESOLVERS = {"sekd.tasks_per_node"}  # OmegaConf resolvers registered under sekd.*, not modules


def stale_module_names(name: str, text: str) -> list[str]:
    """`sekd/...py` paths and dotted `sekd.x.y` names in `text` that name no module or folder of the package
    (a dotted name may end in attributes: sekd.stores.runs.train_hash)."""
    bad = [p for p in re.findall(r"(?<![\w/.-])(sekd/[\w/]+\.py)\b", text) if not (ROOT / p).is_file()]
    for dotted in re.findall(r"(?<![\w/.{-])(sekd(?:\.[a-z_]\w*)+)", text):
        if dotted in RESOLVERS:
            continue
        parts = dotted.split(".")
        head = ROOT.joinpath(*parts[:2])
        if not (head.with_suffix(".py").is_file() or head.is_dir()):
            if not package_attribute(parts[1]):  # sekd.__version__, sekd.__file__: the package's own names
                bad.append(dotted)
            continue
        for k in range(3, len(parts) + 1):  # deeper parts: modules while they exist, then attributes
            sub = ROOT.joinpath(*parts[:k])
            if not (sub.with_suffix(".py").is_file() or sub.is_dir()):
                if ROOT.joinpath(*parts[: k - 1]).is_dir():  # a package's missing child is stale, not an attribute
                    init = ROOT.joinpath(*parts[: k - 1], "__init__.py")
                    names = init.read_text() if init.is_file() else ""
                    if not re.search(rf"\b{parts[k - 1]}\b", names):
                        bad.append(dotted)
                break
    return [f"{name}: {b}" for b in bad]


def package_attribute(name: str) -> bool:
    """A module's own dunder (__file__) or a name sekd/__init__.py defines."""
    own = (ROOT / "sekd" / "__init__.py").read_text()
    return (name.startswith("__") and name.endswith("__")) or re.search(rf"\b{name}\b", own) is not None


def test_docs_and_code_name_modules_that_exist(texts):
    """After a move, every path and dotted module name in the docs, the README, configs and the code itself
    points at the new place: nothing names a module that is gone."""
    bad = [
        line for name, text in texts.items() if not name.startswith("tests/") for line in stale_module_names(name, text)
    ]
    assert not bad, "names of modules that do not exist:\n" + "\n".join(sorted(set(bad)))


def test_the_stale_name_check_sees_gone_modules_and_allows_attributes():
    assert stale_module_names("x", "see sekd/loop.py and sekd.run.run_dir") == [
        "x: sekd/loop.py",
        "x: sekd.run.run_dir",
    ]
    assert stale_module_names("x", "sekd/stores/runs.py, sekd.stores.runs.train_hash, python -m sekd.train") == []
    assert stale_module_names("x", "sekd.stores.gone") == ["x: sekd.stores.gone"]
    assert stale_module_names("x", "sekd.__version__, sekd.__file__") == []  # the package's own names
    assert stale_module_names("x", "sekd.nowhere") == ["x: sekd.nowhere"]
