"""sekd.core.artifacts.build_once: built once under concurrent builders, all or nothing, and the cache names
its users had before it (so existing caches stay valid)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sekd.core.artifacts import build_once, content_key

ROOT = Path(__file__).resolve().parents[2]


# One builder process: appends to the log each time it really builds, slowly enough that the others
# arrive while it holds the lock.
BUILDER = """
import sys, time
from pathlib import Path
from sekd.core.artifacts import build_once
final, log, folder = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "folder"

def build(tmp):
    with open(log, "a") as f:
        f.write("built\\n")
    time.sleep(0.5)
    (tmp / "data.txt" if folder else tmp).write_text("payload")

build_once(final, build, folder=folder)
"""


@pytest.mark.parametrize("folder", [False, True])
def test_concurrent_builders_build_once_and_all_see_it(tmp_path, folder):
    final, log = tmp_path / "thing-0123", tmp_path / "log"
    args = [sys.executable, "-c", BUILDER, str(final), str(log), "folder" if folder else "file"]
    procs = [subprocess.Popen(args, cwd=ROOT) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert (final / "data.txt" if folder else final).read_text() == "payload"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "thing-0123"]  # no lock or temporary left


@pytest.mark.parametrize("folder", [False, True])
def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path, folder):
    final = tmp_path / "thing"

    def broken(tmp: Path) -> None:
        (tmp / "half" if folder else tmp).write_text("half")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        build_once(final, broken, folder=folder)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary sibling, no lock left behind
    build_once(final, lambda tmp: (tmp / "ok" if folder else tmp).write_text("ok"), folder=folder)
    assert (final / "ok" if folder else final).read_text() == "ok"


def test_a_folder_that_is_not_ready_is_rebuilt_and_a_ready_one_is_kept(tmp_path):
    final = tmp_path / "model-abc"
    final.mkdir()
    (final / "weights").write_text("partial")  # an older builder crashed before writing its marker
    ready = lambda p: (p / "inputs.json").exists()  # noqa: E731

    def build(tmp: Path) -> None:
        (tmp / "weights").write_text("whole")
        (tmp / "inputs.json").write_text("{}")

    build_once(final, build, folder=True, ready=ready)
    assert (final / "weights").read_text() == "whole"
    build_once(final, lambda tmp: pytest.fail("a ready artifact is never rebuilt"), folder=True, ready=ready)


def test_keys_are_the_ones_caches_were_named_by():
    # packed data, QA rows and the sample-score store hashed sorted-key JSON (str for the rest); the
    # embedded artifacts the same with their format; run folders 12 hex digits of it
    fields = {"source": "embedded", "split": "train", "seq_len": 64, "path": Path("/x"), "vocab": None}
    old = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    assert content_key(fields) == old[:16] and content_key(fields, 12) == old[:12]


def test_the_embedded_artifact_folder_names_did_not_move(tmp_path):
    from sekd.embedded.build import cached

    inputs = {"corpus": "c0ffee", "vocab_size": 512, "model": "bpe-bytelevel"}
    folder = cached(tmp_path, "tokenizer", inputs, lambda out: (out / "tokenizer.json").write_text("{}"))
    key = hashlib.sha256(json.dumps({"format": 1, **inputs}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert folder == tmp_path / f"tokenizer-{key}"
    assert json.loads((folder / "inputs.json").read_text()) == inputs
