"""Nothing unsafe is loaded, no secret is recorded, and a crash leaves nothing behind (real CLI runs).

- checkpoint.pt is read with weights_only=True: a planted pickle is refused in one line, runs no code;
  a truncated one is refused in one line naming it, and force=true trains the run from scratch;
- ${oc.env:...} values stay text in record.json, config.yaml, overrides.yaml and the wandb config;
- a run killed before its first checkpoint restarts with each step logged once, and the next run of
  the folder removes the temporary files and the training lock a killed run left.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sekd.stores.runs import _compute, _hash, config_hash, resolved, run_dir, train_hash
from tests.helpers import TINY, checkpoint_step, compose_cfg, logged_steps, sekd_train, sekd_train_killed, tiny_cache

RUN = [*TINY, "train.steps=3", "eval=none"]


def args_for(tmp_path: Path, *extra: str) -> list[str]:
    return [*RUN, f"paths.root={tmp_path}/root", f"paths.cache={tmp_path}/cache", *extra]


def folder_of(args: list[str]) -> Path:
    return run_dir(compose_cfg(args))


def steps_logged(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def error_line(res) -> str:
    """The one line a refused run prints (and no traceback)."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return [ln for ln in res.stderr.splitlines() if ln.startswith("sekd: ")][-1]


class Planted:
    """Unpickling this would create `marker`: what a planted checkpoint could do on resume."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_checkpoint_is_refused_and_runs_no_code(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    args = args_for(tmp_path)
    run = folder_of(args)
    run.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"student": Planted(marker)}, run / "checkpoint.pt")

    res = sekd_train(args)
    line = error_line(res)
    assert f"{run / 'checkpoint.pt'}: cannot resume from this checkpoint (UnpicklingError" in line
    assert "force=true" in line and not marker.exists()

    again = sekd_train([*args, "force=true"])  # the documented way out: train from scratch
    assert again.returncode == 0, again.stderr[-3000:]
    assert not marker.exists() and steps_logged(run) == [1, 2, 3] and not (run / "checkpoint.pt").exists()


def test_a_truncated_checkpoint_names_the_file_and_force_starts_over(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    args = args_for(tmp_path, "train.ckpt_every=1")
    root = tmp_path / "root"
    killed = sekd_train_killed(args, ready=lambda: checkpoint_step(root) is not None)  # SIGKILL after a checkpoint
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = folder_of(args)
    ck = run / "checkpoint.pt"
    assert checkpoint_step(root) in (1, 2)  # plain data and tensors only (weights_only=True); 3 is the last step
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])

    line = error_line(sekd_train(args))
    assert f"{ck}: cannot resume from this checkpoint (" in line and "force=true" in line

    again = sekd_train([*args, "force=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" not in again.stdout + again.stderr and steps_logged(run) == [1, 2, 3]


def test_a_restart_from_scratch_logs_each_step_once_and_leaves_nothing_behind(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    args = args_for(tmp_path, "train.ckpt_every=0")  # killed before any checkpoint: the rerun starts over
    root = tmp_path / "root"
    killed = sekd_train_killed(args, ready=lambda: 1 in logged_steps(root))  # SIGKILL once a step is logged
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = folder_of(args)
    assert steps_logged(run) in ([1], [1, 2]) and not (run / "checkpoint.pt").exists()
    stale = run / ".checkpoint.pt.k1ll3d.tmp"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")

    res = sekd_train(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert steps_logged(run) == [1, 2, 3]
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]
    assert leftovers == []


def test_environment_values_stay_out_of_every_record(tmp_path_factory, tmp_path):
    """A token reaches the config through ${oc.env:...}: the records hold the interpolation's text."""
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    secret, other = "tok-S3CR3T-0451", "tok-0TH3R-7734"
    args = args_for(
        tmp_path, "logging=offline", "logging.entity=${oc.env:SEKD_TEST_TOKEN}", "label=run-${oc.env:SEKD_TEST_OTHER}"
    )
    res = sekd_train(args, env={"SEKD_TEST_TOKEN": secret, "SEKD_TEST_OTHER": other})
    assert res.returncode == 0, res.stderr[-3000:]
    root = tmp_path / "root"
    (record,) = root.glob("runs/*/eval-*/record.json")
    rec = json.loads(record.read_text())
    assert rec["config"]["logging"]["entity"] == "${oc.env:SEKD_TEST_TOKEN}"
    assert rec["config"]["label"] == "run-${oc.env:SEKD_TEST_OTHER}"
    assert "logging.entity=${oc.env:SEKD_TEST_TOKEN}" in rec["overrides"]
    files = [p for p in root.rglob("*") if p.is_file()]
    wandb = [p for p in files if "wandb" in p.parts]
    assert wandb and {"record.json", "config.yaml", "overrides.yaml"} <= {p.name for p in files}
    # the label is only in the config: no file at all may hold it, wandb's included
    assert [p for p in files if other.encode() in p.read_bytes()] == []
    # the entity is also wandb's own run parameter (wandb needs it to sync); outside wandb/ it is nowhere
    assert [p for p in files if p not in wandb and secret.encode() in p.read_bytes()] == []


def test_hashes_still_read_the_resolved_values(monkeypatch):
    """Run folders are keyed by these hashes: they hash the resolved config as before, so the text kept
    for records changes no folder, and an environment value that changes the run changes its hash."""
    monkeypatch.setenv("SEKD_TEST_LABEL", "abc")
    cfg = compose_cfg(["label=${oc.env:SEKD_TEST_LABEL}", "preset=p-${oc.env:SEKD_TEST_LABEL}"])
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree.pop("hydra", None)
    assert config_hash(cfg) == _hash(_compute(tree, None)) and resolved(cfg)["preset"] == "p-abc"
    assert resolved(cfg, keep_env=True)["preset"] == "p-${oc.env:SEKD_TEST_LABEL}"
    lr = ["train.lr=${oc.env:SEKD_TEST_LR}"]
    monkeypatch.setenv("SEKD_TEST_LR", "0.002")
    before = train_hash(compose_cfg(lr))
    monkeypatch.setenv("SEKD_TEST_LR", "0.5")
    assert train_hash(compose_cfg(lr)) != before


def test_the_folder_lock_is_exclusive_and_leaves_no_file(tmp_path):
    """Holders never overlap, though each release deletes the file others wait on (they retry on the
    new one), and nothing is left afterwards."""
    import threading
    import time

    from sekd.core.files import folder_lock

    path, inside, overlaps, done = tmp_path / ".train.lock", [], [], []

    def hold(i: int) -> None:
        for _ in range(20):
            with folder_lock(path):
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(list(inside))
                time.sleep(0.0005)
                inside.remove(i)
        done.append(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(done) == 6 and overlaps == [] and not path.exists()
