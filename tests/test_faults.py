"""Faults that arrive while a run works, met for real (docs/bad-inputs.md, "Faults while running"): the disk
under paths.root fills, turns read-only or loses the run folder under a running job. Each ends in one line
and exit status 3; what the run left is whole; the same command then resumes and ends with the weights of an
uninterrupted run. The folders are also checked before work starts: a read-only or too small disk, exit 2."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.disks import fill, mount_tmpfs, remount
from tests.helpers import (
    TINY,
    built_once,
    checkpoint_step,
    injected,
    logged_steps,
    sekd_train,
    sekd_train_paused,
    tiny_cache,
)

STEPS = 6
# on the CPU even where there is a card, as tests/test_oom_faults.py's runs, which read the same reference run
RUN = [*TINY, f"train.steps={STEPS}", "train.ckpt_every=1", "eval=none", "train.device=cpu", "eval.device=cpu"]


def uninterrupted_fault_run(tmp_path_factory) -> Path:
    """<folder>/reference, an uninterrupted run of RUN; <folder>/cache, the tiny pair it ran on (copied, not
    built); <folder>/vm_peak, its peak address space (tests/test_oom_faults.py's host limit). Built once a
    session for this module and tests/test_oom_faults.py (tests/helpers.built_once): copy to modify."""

    def train_reference(folder: Path) -> None:
        tiny_cache(tmp_path_factory, folder / "cache")
        peak = injected(SEKD_TEST_VMPEAK=str(folder / "vm_peak"))
        res = sekd_train(args(folder / "reference", folder / "cache", folder), env=peak)
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once(tmp_path_factory, "faults-reference", train_reference)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The build artifacts (a copy of the reference's cache: the tiny pair) and an uninterrupted run's weights."""
    built = uninterrupted_fault_run(tmp_path_factory)
    cache = shutil.copytree(built / "cache", tmp_path_factory.mktemp("faults") / "cache")
    return cache, weights(built / "reference")


def args(root: Path, cache: Path, hydra: Path) -> list[str]:
    """Hydra's own log stays off the disk under test: a file held open for writing blocks a remount."""
    return [*RUN, f"paths.root={root}", f"paths.cache={cache}", f"hydra.run.dir={hydra}/hydra"]


def run_folder(root: Path) -> Path:
    (run,) = Path(root).glob("runs/*")
    return run


def weights(root: Path) -> dict:
    return load_file(run_folder(root) / "model" / "model.safetensors")


def fault_line(res) -> str:
    """The one line a fault prints: exit status 3, and no traceback."""
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("sekd: ")]
    assert line.startswith("sekd: run fault: ")
    return line


def left_whole(root: Path) -> None:
    """No temporary file; every metrics line whole."""
    assert [p.name for p in Path(root).rglob("*.tmp")] == []
    text = (run_folder(root) / "metrics.jsonl").read_text()
    assert text.endswith("\n") and logged_steps(root) == list(range(1, len(logged_steps(root)) + 1))


def resumes_to_the_same_weights(shared, run_args: list[str], root: Path, step: int | None) -> None:
    again = sekd_train(run_args)
    assert again.returncode == 0, again.stderr[-3000:]
    said = f"resumed from step {step}"
    assert (said in again.stdout + again.stderr) == bool(step), again.stderr[-2000:]
    assert logged_steps(root) == list(range(1, STEPS + 1))
    got, want = weights(root), shared[1]
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_a_disk_that_fills_stops_in_one_line_and_the_rerun_resumes(shared, tmp_path):
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        run_args = args(disk, shared[0], tmp_path)
        res = sekd_train_paused(
            run_args, ready=lambda: (checkpoint_step(disk) or 0) >= 2, action=lambda: bool(fill(disk))
        )
        line, step = fault_line(res), checkpoint_step(disk)
        assert step and step >= 2
        assert f"no space left on device (paths.root={disk}, " in line, line
        assert "; free space on that disk (this run writes about " in line, line
        assert f" there) and re-run the same command: it resumes from step {step} (checkpoint.pt)" in line
        left_whole(disk)
        (disk / "filler.bin").unlink()
        resumes_to_the_same_weights(shared, run_args, disk, step)


def test_a_disk_turned_read_only_stops_in_one_line_and_the_rerun_resumes(shared, tmp_path):
    def read_only() -> bool:
        try:
            remount(disk, read_only=True)
        except OSError as err:  # a file open for writing (a checkpoint half written): a moment later
            assert err.errno == errno.EBUSY
            return False
        return True

    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        run_args = args(disk, shared[0], tmp_path)
        res = sekd_train_paused(run_args, ready=lambda: (checkpoint_step(disk) or 0) >= 2, action=read_only)
        line, step = fault_line(res), checkpoint_step(disk)
        assert (
            f": read-only file system (paths.root={disk}); make that file system writable again and re-run" in line
        ), line
        assert f"it resumes from step {step} (checkpoint.pt)" in line
        remount(disk, read_only=False)
        left_whole(disk)
        resumes_to_the_same_weights(shared, run_args, disk, step)


def test_a_run_folder_removed_under_the_run_stops_in_one_line_and_the_rerun_starts_over(shared, tmp_path):
    root = tmp_path / "root"
    run_args = args(root, shared[0], tmp_path)

    def remove() -> bool:
        shutil.rmtree(run_folder(root))
        return True

    res = sekd_train_paused(run_args, ready=lambda: (checkpoint_step(root) or 0) >= 2, action=remove)
    line = fault_line(res)
    assert "was removed while the run worked" in line and "re-run the same command: it trains from step 0" in line
    assert not (root / "runs").exists() or list((root / "runs").iterdir()) == [], "the folder was made again"
    resumes_to_the_same_weights(shared, run_args, root, None)


def test_a_read_only_root_is_refused_before_any_model_loads(shared, tmp_path):
    with mount_tmpfs(tmp_path / "disk", "1m") as disk:
        remount(disk, read_only=True)
        try:
            res = sekd_train(args(disk / "outputs", tmp_path / "cache", tmp_path))
            plain = [*RUN, f"paths.root={disk}/outputs", f"paths.cache={tmp_path}/cache"]
            hydras = [sekd_train(plain), sekd_train(["-m", *plain, "seed=1,2"])]
        finally:
            remount(disk, read_only=False)
        for out in (res, *hydras):  # the run folder; Hydra's own folder under paths.root, a run's and a sweep's
            assert out.returncode == 2, out.stderr[-3000:]
            assert f"sekd: config error: paths.root: cannot write in {disk} (Read-only file system)" in out.stderr
        assert list(disk.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_any_model_loads(shared, tmp_path):
    with mount_tmpfs(tmp_path / "disk", "64k") as disk:
        res = sekd_train(args(disk, shared[0], tmp_path))
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"sekd: config error: paths.root: {disk} has 64 KiB free, but this run writes about" in res.stderr
        assert list(disk.iterdir()) == []


def test_a_cache_disk_that_fills_while_the_teacher_cache_builds_stops_in_one_line(shared, tmp_path):
    """classes.cache=auto builds its shards under paths.cache: a disk already full there is refused before any
    model loads (the preflight counts the cache); one that fills once the run has started is the same one
    line as paths.root's, and the rerun finishes the cache and the run."""
    with mount_tmpfs(tmp_path / "disk", "16m") as disk:
        shutil.copytree(shared[0], disk / "cache")  # the built pair: the preflight asks no room for it
        fill(disk)
        root = tmp_path / "root"
        run_args = [*args(root, disk / "cache", tmp_path), "classes=rs_kd", "classes.cache=auto"]
        refused = sekd_train([*run_args, "classes.options.n_draws=4"])
        assert (
            refused.returncode == 2 and f"sekd: config error: paths.cache: {disk}/cache has 0 B free" in refused.stderr
        )
        (disk / "filler.bin").unlink()
        res = sekd_train_paused(  # past the preflight: the run folder's config is written
            [*run_args, "classes.options.n_draws=4"],
            ready=lambda: any(root.glob("runs/*/eval-*/config.yaml")),
            action=lambda: bool(fill(disk)),
        )
        line = fault_line(res)
        assert (
            f"{disk}/cache/teacher_cache/" in line and f": no space left on device (paths.cache={disk}/cache, " in line
        )
        assert "free space on that disk (this run writes about " in line, line
        assert line.endswith(" there) and re-run the same command: it trains from step 0"), line
        assert [p.name for p in disk.rglob("*.tmp")] == []
        (disk / "filler.bin").unlink()
        again = sekd_train([*run_args, "classes.options.n_draws=4"])
        assert again.returncode == 0, again.stderr[-3000:]
        assert logged_steps(tmp_path / "root") == list(range(1, STEPS + 1))
