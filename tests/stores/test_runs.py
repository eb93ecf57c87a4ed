"""sekd/stores/runs.py: a run's name (its preset and the overrides that change it) and its folder, found by its
identity (seed and train hash), never by its name. Real Hydra composition; folders made on disk."""

from __future__ import annotations

import pytest

from sekd.stores.runs import (
    changes,
    covers,
    existing_run,
    file_safe,
    is_finished,
    override_key,
    run_dir,
    run_identity,
    run_name,
    train_hash,
)
from tests.helpers import compose_cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("position.signal=kl", "position.signal"),
        ("+position.options.tau=2.0", "position.options.tau"),
        ("++train.lr=0.1", "train.lr"),
        ("~train.lr", "train.lr"),
        ("hydra/launcher=local", "hydra.launcher"),
        ("model=tiny", "model"),
    ],
)
def test_an_override_is_read_by_its_key(override, key):
    assert override_key(override) == key


def test_a_group_covers_its_keys_and_nothing_beside_it():
    assert covers("model", "model.name") and covers("model", "model")
    assert not covers("model", "model_x.name") and not covers("model.name", "model")


def test_only_overrides_that_change_a_hashed_key_name_a_run():
    typed = [
        "experiment=se_kd",  # chooses the preset
        "seed=7",  # a row averages over seeds
        "profile=paper",  # the scale every row of a sweep shares
        "paths.root=/x",
        "logging=disabled",
        "train.threads=1",
        "train.chunk_size=64",
        "stage=train",
        "force=true",
        "label=Mine",
        "preset=mine",
        "hydra/launcher=local",
        "hydra.run.dir=/y",
        "position.signal=kl",
        "train.steps=2",
        "eval=none",
        "model=tiny",
    ]
    assert changes(typed) == ["position.signal=kl", "train.steps=2", "eval=none", "model=tiny"]
    assert run_name("se_kd", typed) == "se_kd (position.signal=kl, train.steps=2, eval=none, model=tiny)"
    assert run_name("se_kd", ["experiment=se_kd", "seed=7", "paths.root=/x"]) == "se_kd"
    assert run_name("custom", []) == "custom"


def test_a_key_typed_twice_is_named_once_by_its_last_value():
    assert changes(["position.k=0.1", "train.steps=2", "position.k=0.3"]) == ["train.steps=2", "position.k=0.3"]


@pytest.mark.parametrize(
    "name, safe",
    [
        ("se_kd", "se_kd"),
        ("se_kd (position.signal=kl)", "se_kd_position.signal=kl"),
        ("se_kd (data=gsm8k, data.train_file=/data/x y.jsonl)", "se_kd_data=gsm8k_data.train_file=_data_x_y.jsonl"),
        ("a:b;c#d?e'f", "a_b_c_d_e_f"),
        ("(())", "run"),
    ],
)
def test_a_name_becomes_a_folder_name(name, safe):
    assert file_safe(name) == safe


def test_a_long_name_is_cut_and_never_ends_in_a_separator():
    long = "se_kd (" + ", ".join(f"position.options.key{i}=value" for i in range(20)) + ")"
    assert len(file_safe(long)) <= 80 and not file_safe(long).endswith(("_", ".", ",", "=", "-"))
    assert len(file_safe(long, 40)) <= 40 and file_safe(long, 40) == "se_kd_position.options.key0=value"
    assert file_safe("x" * 100, 10) == "x" * 10


def test_a_new_folder_is_named_by_its_preset_and_an_existing_one_is_found_by_its_identity(tmp_path):
    root = f"paths.root={tmp_path}"
    by_overrides = compose_cfg(["experiment=se_kd", "position.signal=kl", root])
    by_preset = compose_cfg(["experiment=top_kl", root])
    h = train_hash(by_preset)
    assert train_hash(by_overrides) == h
    fresh = run_dir(by_overrides)
    assert fresh == tmp_path / "runs" / f"se_kd-s1337-{h}"
    assert run_dir(by_preset) == tmp_path / "runs" / f"top_kl-s1337-{h}"
    fresh.mkdir(parents=True)  # route A made its folder: route B, another preset, finds it
    assert run_dir(by_preset) == fresh
    other_seed = compose_cfg(["experiment=top_kl", "seed=7", root])
    assert run_dir(other_seed).name == f"top_kl-s7-{train_hash(other_seed)}"


def test_two_folders_of_one_identity_resolve_to_the_trained_one_then_the_first(tmp_path):
    under = tmp_path / "under"
    a, b = under / "b_route-s1-abc123", under / "a_route-s1-abc123"
    a.mkdir(parents=True), b.mkdir()
    assert existing_run(under, "-s1-abc123") == b
    (a / "model").mkdir()
    (a / "model" / "config.json").write_text("{}"), (a / "train_stats.json").write_text("{}")
    assert existing_run(under, "-s1-abc123") == a
    assert existing_run(under, "-s1-fff") is None and existing_run(tmp_path / "none", "-s1-abc123") is None


def test_a_seedless_identity_never_takes_a_seeded_folder(tmp_path):
    under = tmp_path / "under"
    (under / "se_kd-s1-abc123").mkdir(parents=True)
    assert existing_run(under, "-abc123") is None
    (under / "student-abc123").mkdir()
    assert existing_run(under, "-abc123") == under / "student-abc123"


def test_a_seedless_run_is_found_whatever_its_seed_and_name(tmp_path):
    root = f"paths.root={tmp_path}"
    first = compose_cfg(["experiment=student", "seed=1", root])
    folder = run_dir(first)
    assert folder.name == f"student-{train_hash(first)}"
    folder.mkdir(parents=True)
    assert run_dir(compose_cfg(["mode=score_student", "seed=2", root])) == folder


def test_a_finished_run_is_finished_for_every_route_to_it(tmp_path):
    root = f"paths.root={tmp_path}"
    route_a, route_b = ["experiment=full_kd", "stage=train", root], ["stage=train", root]  # full_kd is the default
    a, b = compose_cfg(route_a), compose_cfg(route_b)
    assert run_identity(a) == run_identity(b) and not is_finished(a)
    folder = run_dir(a)
    assert folder.name == f"full_kd{run_identity(a)}" and run_dir(b).name == f"custom{run_identity(a)}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}"), (folder / "train_stats.json").write_text("{}")
    assert is_finished(b) and run_dir(b) == folder
    assert not is_finished(compose_cfg([*route_b, "force=true"]))
