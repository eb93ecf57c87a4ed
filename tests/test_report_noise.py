"""`sekd-report` says whether each method's difference from Full KD is within or beyond seed noise (a paired
t-test over the seeds, sekd.report.tables.paired_difference), so no reader takes noise for a finding.
Records as sekd/app/record.py writes them (tests/test_report_tables.record)."""

import copy

import pandas as pd
import pytest

from sekd.report import tables
from sekd.stores.runs import resolved
from sekd.report.results import main as report_main
from tests.helpers import compose_cfg
from tests.test_report_groups import table
from tests.test_report_tables import deep_update, record

SEEDS = (1337, 1338, 1339)


@pytest.fixture(scope="module")
def configs():
    return {
        name: resolved(compose_cfg([f"experiment={name}"])) for name in ("full_kd", "se_kd", "random_pos", "student")
    }


def by_seed(values, seeds=SEEDS):
    return pd.Series(values, index=list(seeds[: len(values)]))


def test_a_shift_larger_than_the_seeds_spread_is_beyond_noise():
    d = tables.paired_difference(by_seed([15.0, 16.1, 14.9]), by_seed([17.0, 18.0, 17.1]))
    assert d["verdict"] == tables.BEYOND and d["n"] == 3 and d["p"] < 0.05
    assert d["diff"] == pytest.approx(-(2.0 + 1.9 + 2.2) / 3)


def test_a_shift_the_seeds_spread_covers_is_within_noise():
    d = tables.paired_difference(by_seed([15.0, 19.0, 16.0]), by_seed([17.0, 16.0, 17.5]))
    assert d["verdict"] == tables.WITHIN and d["p"] > 0.05


def test_pairing_is_by_seed_and_fewer_than_two_shared_seeds_cannot_tell():
    # seed 1339 has no Full KD partner: only 1337 and 1338 pair, each 3 points below, beyond noise
    d = tables.paired_difference(by_seed([14.0, 15.0, 99.0]), pd.Series([17.0, 18.0], index=[1337, 1338]))
    assert (d["n"], d["diff"], d["verdict"]) == (2, -3.0, tables.BEYOND)
    one = tables.paired_difference(by_seed([14.0]), by_seed([17.0]))
    assert one["verdict"] == tables.CANNOT_TELL and tables.fmt_difference(one) == "-3.0 cannot tell (n=1)"
    assert tables.fmt_difference(tables.paired_difference(by_seed([]), by_seed([17.0]))) == tables.MISSING


def test_the_report_marks_each_method_against_full_kd_of_the_same_setting(configs, tmp_path, capsys):
    runs = tmp_path / "runs"
    record(configs["student"], "student", 1337, (14.0, 12000.0, 60.0), runs)
    full = {1337: 17.0, 1338: 18.0, 1339: 17.1}
    clear = {1337: 15.0, 1338: 16.1, 1339: 14.9}  # 2 points below Full KD under every seed
    noisy = {1337: 15.0, 1338: 19.0, 1339: 16.0}  # below, above, below: the seeds disagree
    for seed in SEEDS:
        record(configs["full_kd"], "full_kd", seed, (full[seed], 7000.0 + seed, 50.0), runs)
        record(configs["se_kd"], "se_kd", seed, (clear[seed], 9000.0 + seed, 55.0), runs)
        record(configs["random_pos"], "random_pos", seed, (noisy[seed], 7000.0 + seed, 52.0), runs)
    # a longer Full KD and SE-KD with one seed: compared with each other, not with the rows above
    longer = {
        name: deep_update(copy.deepcopy(configs[name]), {"train": {"steps": 1000}}) for name in ("full_kd", "se_kd")
    }
    record(longer["full_kd"], "full_kd", 1337, (20.0, 5000.0, 40.0), runs)
    record(longer["se_kd"], "se_kd", 1337, (21.0, 5100.0, 40.0), runs)
    assert report_main([str(runs), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    t = table(tmp_path / "out")
    se_kd = t.loc["Student entropy (SE-KD) (train.steps=300)"]
    assert se_kd["Acc. vs Full KD"].startswith("-2.0 beyond noise (p=")
    assert se_kd["PPL vs Full KD"].startswith("+2000.00 beyond noise")  # the same shift under every seed
    assert t.loc["RandomPos 20%", "Acc. vs Full KD"].startswith("-0.7 within noise")
    assert t.loc["Student entropy (SE-KD) (train.steps=1000)", "Acc. vs Full KD"] == "+1.0 cannot tell (n=1)"
    assert set(t.loc[[i for i in t.index if i.startswith("Full KD")], "Acc. vs Full KD"]) == {"ref."}
    assert t.loc["Student (no distillation)", "Acc. vs Full KD"] == tables.MISSING  # not distilled


def test_the_report_marks_each_method_against_the_undistilled_student(configs, tmp_path, capsys):
    # the student trains nothing, so its one score stands for every seed: a one-sample test of each method
    runs = tmp_path / "runs"
    record(configs["student"], "student", 1337, (14.0, 12000.0, 60.0), runs)
    full = {1337: 17.0, 1338: 18.0, 1339: 17.1}  # 3-4 points above the student under every seed
    noisy = {1337: 13.0, 1338: 17.0, 1339: 14.5}  # below, above, above: the seeds disagree
    for seed in SEEDS:
        record(configs["full_kd"], "full_kd", seed, (full[seed], 7000.0 + 10 * seed, 50.0), runs)
        record(configs["random_pos"], "random_pos", seed, (noisy[seed], 12000.0 + seed - 1338, 52.0), runs)
    assert report_main([str(runs), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    t = table(tmp_path / "out")
    assert t.loc["Full KD", "Acc. vs Student"].startswith("+3.4 beyond noise (p=")
    assert "n=3" in t.loc["Full KD", "Acc. vs Student"]
    assert t.loc["Full KD", "PPL vs Student"].startswith("+8380.00 beyond noise")  # worse, and every seed says so
    assert t.loc["RandomPos 20%", "Acc. vs Student"].startswith("+0.8 within noise")
    assert t.loc["RandomPos 20%", "PPL vs Student"].startswith("+0.00 within noise")
    assert t.loc["Student (no distillation)", "Acc. vs Student"] == "ref."
    assert t.loc["Student (no distillation)", "Acc. vs Full KD"] == tables.MISSING


def test_the_full_kd_preset_with_another_class_axis_is_a_method_not_a_second_reference(configs, tmp_path, capsys):
    """sweeps/sparse_targets.yaml runs `experiment=full_kd classes=...`: those rows are compared with Full KD
    as it is (its own selection axes), and only that row is the reference."""
    runs = tmp_path / "runs"
    sparse = deep_update(copy.deepcopy(configs["full_kd"]), {"classes": {"name": "top_k_tail", "options": {"top": 14}}})
    full = {1337: 17.0, 1338: 18.0, 1339: 17.1}
    for seed in SEEDS:
        record(configs["full_kd"], "full_kd", seed, (full[seed], 7000.0 + seed, 50.0), runs)
        record(sparse, "full_kd", seed, (full[seed] - 2.0, 9000.0 + seed, 55.0), runs)
    assert report_main([str(runs), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    t = table(tmp_path / "out")
    refs = t.index[t["Acc. vs Full KD"].eq("ref.")].tolist()
    assert len(refs) == 1 and "top_k_tail" not in refs[0]
    (other,) = [i for i in t.index if i != refs[0]]
    assert t.loc[other, "Acc. vs Full KD"].startswith("-2.0 beyond noise (p=")
