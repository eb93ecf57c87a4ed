"""All three axes at once: sample scores reused, an offline cache that serves training without the
teacher, and SE-KD3X's position selection applied on top of cached classes (docs/method.md §7-§9, §13)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, sekd_train, tiny_cache


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    tiny_cache(tmp_path_factory, folder / "cache")  # the pair prebuilt: these tests are about the teacher's cache
    return folder


def record(root):
    (path,) = list(root.glob("runs/*/eval-*/record.json"))
    return json.loads(path.read_text())


def run(preset, shared, name, *extra):
    res = sekd_train(
        [
            *TINY,
            f"experiment={preset}",
            "train.steps=3",
            "eval=none",
            "train.trace_selection_steps=1",
            f"paths.root={shared}/{name}",
            f"paths.cache={shared}/cache",
            *extra,
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return record(shared / name)


def test_se_kd3x_builds_once_then_trains_without_the_teacher(shared):
    first = run("se_kd3x", shared, "first")
    c = first["costs"]
    assert c["teacher_loaded"] and c["cache_build_seconds"] > 0 and c["cache_build_teacher_tokens"] > 0
    assert not c["prepass_reused"] and c["prepass_seconds"] > 0
    assert c["cache_bytes_read"] > 0
    second = run("se_kd3x", shared, "second", "seed=1337", "train.lr=0.002")
    c2 = second["costs"]
    assert not c2["teacher_loaded"] and c2["teacher_forward_tokens"] == 0  # the teacher never loaded
    assert c2["prepass_reused"] and c2["prepass_seconds"] == 0  # Table 7's reuse row: no scoring
    assert c2["cache"] == c["cache"] and c2["cache_build_seconds"] == 0

    # positions are still selected on top of the cached classes (the paper's code ignores them)
    (trace,) = list((shared / "second").glob("runs/*/selection_trace.jsonl"))
    rows = [json.loads(ln) for ln in trace.read_text().splitlines()]
    assert all(len(r["selected"]) < len(r["valid"]) for r in rows)
    assert second["tokens_supervised"] < 0.3 * sum(len(r["valid"]) for r in rows) * 3


def test_a_cache_from_sekd_cache_build_serves_training(shared, tmp_path):
    """Built once by the CLI over the whole train split: any class-axis run reads it, teacher unloaded."""
    out = tmp_path / "cache"  # built with the run's own overrides (sekd-cache composes them as sekd-train)
    res = subprocess.run(
        [sys.executable, "-m", "sekd.cli.cache", "build", "--out", str(out), *TINY, f"paths.cache={shared}/cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rec = run("rs_kd", shared, "from_cli", f"classes.cache={out}")
    assert not rec["costs"]["teacher_loaded"] and rec["costs"]["teacher_forward_tokens"] == 0
    assert rec["costs"]["cache_bytes_read"] > 0
    # a cache drawn with another N is refused up front, with one line naming the key
    bad = sekd_train(
        [
            *TINY,
            "experiment=rs_kd",
            "classes.options.n_draws=12",
            f"classes.cache={out}",
            "eval=none",
            f"paths.root={tmp_path}/bad",
            f"paths.cache={shared}/cache",
        ]
    )
    assert bad.returncode == 2
    assert "classes.cache" in bad.stderr.strip().splitlines()[-1] and "n_draws" in bad.stderr.strip().splitlines()[-1]


def test_a_target_chosen_by_the_student_trains_online_with_reverse_kl(shared):
    """The union of the teacher's and the student's top-k, with a tail class, read by reverse KL: online
    through the real CLI (the student's logits reach the sampler at every step), named by its overrides."""
    rec = run(
        "full_kd",
        shared,
        "union",
        "classes=union_top_k",
        "classes.options.top=4",
        "classes.options.normalization=tail",
        "criterion=reverse_kl",
    )
    assert rec["config"]["classes"] == {
        "name": "union_top_k",
        "options": {"top": 4, "normalization": "tail"},
        "cache": None,
    }
    assert "classes=union_top_k" in rec["changes"] and rec["costs"]["teacher_loaded"]
    assert rec["steps"] == 3 and rec["tokens_supervised"] > 0
    (metrics,) = list((shared / "union").glob("runs/*/metrics.jsonl"))
    losses = [json.loads(ln).get("loss") for ln in metrics.read_text().splitlines()]
    assert any(x is not None and 0 < x < float("inf") for x in losses)
