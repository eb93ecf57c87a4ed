"""The free-space estimate of sekd/app/preflight.py: the teacher cache (classes.cache=auto) and the sample-score
store under paths.cache, from the config's shapes; nothing more to write once the run is trained."""

from __future__ import annotations

import pytest

from sekd.app.checks import validate
from sekd.app.preflight import SCORE_ENTRY_BYTES, check_space, estimate
from sekd.core.errors import ConfigError
from tests.disks import mount_tmpfs
from tests.helpers import TINY, compose_cfg

BUDGET, SEQ = 64_000, 64  # data.token_budget, data.seq_len (TINY's)


def typed(tmp_path, *extra: str):
    """TINY with a token budget, its embedded pair taken as built (no bytes for it under paths.cache)."""
    (tmp_path / "c" / "embedded" / "model-x").mkdir(parents=True, exist_ok=True)
    return validate(compose_cfg([*TINY, f"data.token_budget={BUDGET}", f"paths.cache={tmp_path}/c", *extra]))


def test_the_teacher_cache_counts_its_records_per_position(tmp_path):
    """4 draws of the tiny vocabulary: narrow 3-byte records, one byte of count and a valid bit a position."""
    plain = estimate(typed(tmp_path, "classes=rs_kd", "classes.options.n_draws=4"))
    auto = estimate(typed(tmp_path, "classes=rs_kd", "classes.options.n_draws=4", "classes.cache=auto"))
    assert "paths.cache" not in plain
    assert auto["paths.cache"] == int(BUDGET * (1 / 8 + 1 + 4 * 3)) and auto["paths.root"] == plain["paths.root"]


def test_the_sample_scores_count_one_entry_per_training_sample(tmp_path):
    assert estimate(typed(tmp_path, "samples=top_student_entropy"))["paths.cache"] == SCORE_ENTRY_BYTES * BUDGET // SEQ
    assert "paths.cache" not in estimate(typed(tmp_path, "samples=random"))  # no pre-pass, no store


def test_without_a_token_budget_the_steps_give_the_tokens(tmp_path):
    (tmp_path / "c" / "embedded" / "model-x").mkdir(parents=True)
    cfg = validate(compose_cfg([*TINY, "train.steps=10", f"paths.cache={tmp_path}/c", "samples=kl"]))
    assert estimate(cfg)["paths.cache"] == SCORE_ENTRY_BYTES * 10 * 4 * 2  # steps x micro-batch x grad_accum


def test_a_trained_run_only_scores_and_needs_no_room_to_train(tmp_path):
    cfg = typed(tmp_path, "classes=rs_kd", "classes.cache=auto", "samples=kl")
    assert estimate(cfg, trained=True) == {} and set(estimate(cfg)) == {"paths.root", "paths.cache"}


def test_a_cache_disk_too_small_for_the_teacher_cache_is_refused(tmp_path):
    cfg = typed(tmp_path, "classes=rs_kd", "classes.options.n_draws=64", "classes.cache=auto")
    with mount_tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(
            ConfigError,
            match=f"^paths.cache: {small} has 1 MiB free, but this run writes about 15 MiB there \\(the embedded pair, the teacher cache",
        ):
            check_space(cfg, [("paths.cache", small / "cache")])
        check_space(cfg, [("paths.cache", small / "cache")], trained=True)  # it only scores: nothing to build
