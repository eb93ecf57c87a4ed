"""Run folders and records are named by `config_hash`, `train_hash` and `eval_hash`: a refactor of the config
must not move them. tests/fixtures/config_hashes.json holds today's hashes of every preset (alone, and under
each profile) and of every cell of every sweep under each profile, plus a few common overrides; this test
composes each again and compares. Regenerate the fixture ONLY for a deliberate, documented hash migration:
    python -m tests.test_config_hashes --write
"""

from __future__ import annotations

import json
import sys

import pytest
from hydra import compose, initialize_config_dir

from sekd.stores.runs import config_hash, eval_hash, train_hash
from tests.helpers import CONF, PRESETS, ROOT, composed
from tests.test_sweeps import NAMES, SWEEPS, grid

FIXTURE = ROOT / "tests" / "fixtures" / "config_hashes.json"
PROFILES = ("embedded", "paper")
SEARCH = f"hydra.searchpath=[file://{CONF}]"
# Overrides users commonly give beside a preset: other data sources, regimes, criteria, class samplers.
EXTRA = [
    ["data=arith"],
    ["data=gsm8k"],
    ["data=fineweb_edu"],
    ["data=gsm8k", "data.train_file=x.jsonl"],
    ["regime=on_policy", "data=arith"],
    ["regime=on_policy", "data=gsm8k", "regime.mix=0.5"],
    ["criterion=dkd"],
    ["criterion=atkd"],
    ["criterion=weighted", "position=top_k"],
    ["classes=top_k_truncation"],
    ["classes=rs_kd", "classes.cache=auto"],
    ["position=gls"],
    ["position=curriculum"],
    ["position=pos_rs", "position.options.tau=2.0"],
    ["samples=kl"],
    ["model=tiny"],
    ["model=qwen3_8b_to_1.7b"],
    ["train=paper"],
    ["eval=paper"],
    ["eval=validation"],
    ["eval=none"],
    ["eval=task"],
    ["logging=disabled"],
    ["train.lr=0.5", "seed=7"],
    ["stage=train"],
    ["mode=score_student"],
    ["train.steps=3", "eval.limit=5"],
    ["data.token_budget=1000"],
]


def cases() -> dict[str, tuple[str, list[str]]]:
    """id -> (config name in conf/ or sweeps/, overrides)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for preset in PRESETS:
        out[f"config experiment={preset}"] = ("config", [f"experiment={preset}"])
        for profile in PROFILES:  # a preset under a profile: through a sweep file, which selects the profile
            out[f"t4 profile={profile} experiment={preset}"] = ("t4", [f"profile={profile}", f"experiment={preset}"])
    for extra in EXTRA:
        out["config " + " ".join(extra)] = ("config", extra)
    for name in NAMES:
        for profile in PROFILES:
            for cell in grid(name):
                overrides = [f"profile={profile}", *cell]
                out[f"{name} " + " ".join(overrides)] = (name, overrides)
    return out


def all_hashes() -> dict[str, dict[str, str]]:
    """id -> its three hashes. A seed is a plain value: each cell is composed once and its seeds set on it."""
    by_config: dict[tuple, dict[str, int | None]] = {}
    for case, (name, overrides) in cases().items():
        seeds = [int(o.removeprefix("seed=")) for o in overrides if o.startswith("seed=")]
        rest = tuple(o for o in overrides if not o.startswith("seed="))
        by_config.setdefault((name, rest), {})[case] = seeds[0] if seeds else None
    out = {}
    for (name, rest), seeded in by_config.items():
        where = CONF if name == "config" else SWEEPS
        cfg = composed(where, name, [*([] if name == "config" else [SEARCH]), *rest])  # tests/test_sweeps.py's too
        default_seed = cfg.seed
        for case, seed in seeded.items():
            cfg.seed = default_seed if seed is None else seed
            # the identity on a machine without a GPU (precision auto resolves to fp32), wherever the test runs
            out[case] = {
                "config_hash": config_hash(cfg, cuda=False),
                "train_hash": train_hash(cfg, cuda=False),
                "eval_hash": eval_hash(cfg, cuda=False),
            }
    return out


def test_the_fixture_covers_every_preset_and_sweep_cell():
    assert set(json.loads(FIXTURE.read_text())) == set(cases())


@pytest.mark.slow  # composes all 625 cases: ~40 s
@pytest.mark.xdist_group("compose")  # beside tests/test_sweeps.py's, which compose the same sweep cells
def test_every_hash_is_what_it_was():
    expected, now = json.loads(FIXTURE.read_text()), all_hashes()
    changed = [f"{case}: {now[case]} != {expected[case]}" for case in expected if now.get(case) != expected[case]]
    assert not changed, f"{len(changed)} of {len(expected)} hashes moved, e.g. {changed[:3]}"


def test_a_run_on_several_ranks_is_named_by_its_global_micro_batch(monkeypatch):
    """micro_batch_size is per rank: 2 ranks x 2 share the folder of 1 process x 4 (the same sequences, the
    same step), never that of 1 process x 2; the launcher's environment sets the world size by default."""
    from sekd.stores.runs import run_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        two = compose(config_name="config", overrides=["experiment=se_kd", "train.micro_batch_size=2"])
        four = compose(config_name="config", overrides=["experiment=se_kd", "train.micro_batch_size=4"])
    assert train_hash(two, world=2) == train_hash(four, world=1) == train_hash(four)
    assert config_hash(two, world=2) == config_hash(four, world=1)
    assert train_hash(two, world=2) != train_hash(two, world=1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert run_dir(two) == run_dir(two, world=1)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", "29500")
    assert run_dir(two) == run_dir(four, world=1)


ROUTES = [  # two routes to the same settings: one run, whatever the preset's name (names are not hashed)
    (["experiment=se_kd", "position.signal=kl"], ["experiment=top_kl"]),
    (["experiment=se_kd", "samples=top_student_entropy"], ["experiment=se_kd_top_smp"]),
    (["experiment=full_kd"], []),  # Full KD is the preset-less default
    (["experiment=top_kl", "position.signal=student_entropy", "label=Mine"], ["experiment=se_kd"]),
]


@pytest.mark.parametrize("route_a, route_b", ROUTES)
def test_two_routes_to_the_same_settings_are_one_run(route_a, route_b):
    a, b = composed(CONF, "config", route_a), composed(CONF, "config", route_b)
    assert a.preset != b.preset
    for hashed in (config_hash, train_hash, eval_hash):
        assert hashed(a, cuda=False) == hashed(b, cuda=False)
    b.position.k = 0.3  # a setting, not a name: another run
    assert train_hash(a, cuda=False) != train_hash(b, cuda=False)


def test_no_two_presets_are_one_run():
    """Each preset trains something of its own: two presets with one identity would fill one paper row and
    leave the other's empty (its run found the first's folder)."""
    table = json.loads(FIXTURE.read_text())
    by_hash: dict[str, list[str]] = {}
    for preset in PRESETS:
        by_hash.setdefault(table[f"config experiment={preset}"]["config_hash"], []).append(preset)
    assert [names for names in by_hash.values() if len(names) > 1] == []


def write() -> None:
    FIXTURE.parent.mkdir(exist_ok=True)
    table = all_hashes()
    FIXTURE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(table)} cases -> {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(pytest.main([__file__, "-q"]))
    write()
