"""train.profile_steps: a torch.profiler trace of a few optimizer steps in the run folder, for reading where
a step's time and memory go (the GPU check records one at the paper's shapes). Profiling changes nothing
the run computes, so it is not part of the run's identity."""

from __future__ import annotations

import json

from sekd.stores.runs import train_hash
from tests.helpers import TINY, compose_cfg, sekd_train, tiny_cache


def test_profile_steps_writes_a_trace_of_those_steps_and_keeps_the_run_folder(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    base = [
        *TINY,
        "experiment=se_kd",
        "train.steps=3",
        "eval=none",
        f"paths.root={tmp_path}",
        f"paths.cache={tmp_path}/cache",
    ]
    res = sekd_train([*base, "train.profile_steps=5"], env={"OMP_NUM_THREADS": "1"})  # more than the run has
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    trace = json.loads((run / "profile-rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("mm" in n for n in names)  # the heads' and layers' matrix products were traced
    assert not list(run.glob(".*.tmp"))
    assert train_hash(compose_cfg(["experiment=se_kd", "train.profile_steps=2"]), cuda=False) == train_hash(
        compose_cfg(["experiment=se_kd"]), cuda=False
    )


def test_profile_steps_must_be_a_count():
    import pytest

    from sekd.core.errors import ConfigError

    from sekd.app.checks import typed

    with pytest.raises(ConfigError, match="train.profile_steps"):
        typed(compose_cfg(["train.profile_steps=-1"]))
