"""sekd/stores/teacher_cache/kinds.py: a kind per class sampler that reads the teacher alone; a student-dependent
one refused in one line, by the kind and by the run's config before anything loads."""

import pytest

from sekd.app.checks import check_command_line
from sekd.core.errors import ConfigError
from sekd.selection.classes import CLASSES
from sekd.stores.teacher_cache.kinds import KindError, bytes_per_position_bound, cache_kind, parse_kind
from tests.helpers import CONF


def test_every_teacher_only_sampler_is_a_kind():
    for name in CLASSES.names():
        if CLASSES.get(name).needs_student:
            continue
        kind = cache_kind(name)
        assert kind.form == CLASSES.get(name).form_of(kind.options)
        assert set(kind.options) == set(CLASSES.options(name))  # completed by the defaults
        assert kind.signature()["kind"] == name and kind.records == ("counts" if name == "rs_kd" else "probs")


@pytest.mark.parametrize("name", [n for n in CLASSES.names() if CLASSES.get(n).needs_student])
def test_a_student_dependent_sampler_is_refused_in_one_line(name):
    with pytest.raises(KindError) as e:
        cache_kind(name, {"top": 4})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"classes.cache: classes.name={name}") and "student" in msg


@pytest.mark.parametrize("name", [n for n in CLASSES.names() if CLASSES.get(n).needs_student])
def test_the_run_refuses_a_cache_of_a_student_dependent_sampler(name, tmp_path):
    """check_command_line (sekd-train's first step): refused before anything is built or loaded."""
    for cache in ("auto", str(tmp_path)):
        with pytest.raises(ConfigError) as e:
            check_command_line(["model=tiny", f"classes={name}", f"classes.cache={cache}"], str(CONF), "config")
        msg = str(e.value)
        assert "\n" not in msg and f"classes.name={name} chooses its classes by the student" in msg, msg


def test_full_has_no_cache():
    with pytest.raises(ConfigError, match="classes.cache holds a sparse target"):
        check_command_line(["model=tiny", "classes=full", "classes.cache=auto"], str(CONF), "config")


def test_parse_kind():
    kind = parse_kind("top_k_truncation:top=20,normalization=raw")
    assert (kind.name, kind.options, kind.form) == ("top_k_truncation", {"top": 20, "normalization": "raw"}, "raw")
    assert kind.label() == "top_k_truncation.normalization-raw.top-20"
    assert parse_kind("top_p:p=0.5").options == {"p": 0.5, "max_k": 64}
    for bad, words in (("top_p:p", "key=value"), ("top_p:p=2", "classes.options.p=2"), ("nope", "no cacheable")):
        with pytest.raises(KindError, match=words):
            parse_kind(bad)


def test_bytes_per_position_bound():
    """A valid bit, one byte of len, 4-byte records, the tail's 2 bytes; top-p at its widest (flat logits)."""
    assert bytes_per_position_bound(cache_kind("top_k_tail", {"top": 4}), 300) == 1 / 8 + 1 + 4 * 4 + 2
    widest = bytes_per_position_bound(cache_kind("top_p", {"p": 0.5, "max_k": 500}), 300) - 1 / 8 - 1
    assert widest in (150 * 4, 151 * 4)  # half of 300 flat classes (one more where float32's sum falls short)
    assert bytes_per_position_bound(cache_kind("rs_kd", {"n_draws": 4}), 2**18 + 1) == 1 / 8 + 1 + 4 * 6
