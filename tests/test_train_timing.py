"""A record's timing: `train_time_s` is distillation alone; pretraining the embedded pair is its own cost
(`costs.pretrain_seconds`, 0 when the pair was already built), never charged to whichever cell ran first."""

import json

from tests.helpers import TINY, sekd_train


def run(tmp_path, cache, *args):
    res = sekd_train([*TINY, "eval=none", f"paths.root={tmp_path / 'out'}", f"paths.cache={cache}", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = [
        p
        for p in (tmp_path / "out").glob("runs/*/eval-*/record.json")
        if json.loads(p.read_text())["preset"] == args[0].split("=")[1]
    ]
    return json.loads(path.read_text())


def test_pretraining_is_its_own_cost_and_train_time_is_distillation_only(tmp_path):
    cache = tmp_path / "cache"
    first = run(tmp_path, cache, "experiment=student")  # scores nothing, trains nothing: builds the pair
    assert first["costs"]["pretrain_seconds"] > 0.5
    assert first["train_time_s"] == 0.0
    assert first["wall_time_s"] >= first["costs"]["pretrain_seconds"]
    later = run(tmp_path, cache, "experiment=full_kd", "train.steps=2")  # the pair exists: reused
    c = later["costs"]
    assert c["pretrain_seconds"] == 0.0 and c["cache_build_seconds"] == 0.0
    assert 0 < later["train_time_s"] <= later["wall_time_s"]
    stats = json.loads((tmp_path / "out" / "runs" / later["run_dir"].split("/")[-1] / "train_stats.json").read_text())
    assert stats["train_time_s"] == later["train_time_s"]  # a later stage=score job reports the same
