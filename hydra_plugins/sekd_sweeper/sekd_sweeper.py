"""`hydra/sweeper=sekd`: Hydra's grid sweeper that looks at every cell before any job starts.

Before the launcher (local, or Slurm through submitit) sees a job, each cell's config is composed and
validated, so one bad cell stops the sweep with a one-line error naming the cell and key, before anything
is submitted; cells with nothing left to do for their stage are dropped, so re-running a finished sweep
submits nothing. A cell that died midway is resubmitted and resumes from its checkpoint; a failed cell is
one line and the others finish. Locally each cell's environment is checked too; with Slurm, that `sbatch`
exists, and a controller that does not answer while a batch is submitted or waited for ends the sweep in
one line, exit 3, with each cell's state (slurm_watch.py). A job of several tasks is still one cell:
hydra-submitit's launcher hands this sweeper rank 0's result, the cell's.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf, open_dict

from . import slurm_watch  # its classes looked up at use: Hydra's plugin scan executes the module again
from .slurm_watch import Silence

log = logging.getLogger(__name__)


class SekdSweeper(BasicSweeper):
    def __init__(
        self, max_batch_size: Optional[int] = None, params: Optional[dict] = None, skip_finished: bool = True
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.skip_finished = skip_finished
        self.done_checks: Dict[tuple, Callable[[], bool]] = {}  # per cell to run: whether its run has finished

    def on_slurm(self) -> bool:
        """Whether the launcher submits to Slurm (submitit's SlurmLauncher): jobs run on other nodes."""
        assert self.config is not None
        return str(self.config.hydra.launcher.get("_target_", "")).endswith("SlurmLauncher")

    def job_world_size(self, cfg) -> Optional[int]:
        """The ranks a cell's job will run on, which name its run folder (sekd.stores.runs.train_hash): on Slurm,
        nodes x tasks per node; otherwise None, the ranks this process was launched with."""
        if not self.on_slurm():
            return None  # as this process was launched
        launcher = cfg.hydra.launcher
        return int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)

    def job_cuda(self, cfg) -> Optional[bool]:
        """Whether a cell's job will have a GPU, which resolves train.precision=auto in its identity (sekd.stores.runs):
        on Slurm, whether the job asks for one; otherwise None, whether this machine has one."""
        if not self.on_slurm():
            return None
        launcher = cfg.hydra.launcher
        gres = str(launcher.get("gres") or "")
        return bool(launcher.get("gpus_per_node") or launcher.get("gpus_per_task") or "gpu" in gres)

    def runs_elsewhere(self) -> bool:
        """Whether cells run outside this process (local subprocesses, Slurm jobs), which show nothing here
        while the launcher waits; Hydra's basic launcher runs them here, with their own progress bars."""
        return type(self.launcher).__name__ != "BasicLauncher"

    def cells(self, arguments: List[str]) -> List[List[str]]:
        """Every cell of the grid, as its list of overrides (sweeper params first, then the command line)."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        return [cell for batch in self.split_arguments(overrides, None) for cell in batch]

    def triage(self, cells: List[List[str]]) -> tuple[List[List[str]], List[str], List[str], List[str]]:
        """(cells to run, lines for cells already finished, lines for cells that are the same run as an earlier
        cell, one-line errors); composes each cell once."""
        from sekd.core.errors import ConfigError
        from sekd.app.checks import validate
        from sekd.models.loading import check_environment
        from sekd.stores.runs import is_finished, run_dir, run_identity, eval_dir, trained

        assert self.hydra_context is not None and self.config is not None
        todo, finished, same, errors = [], [], [], []
        first: dict[str, tuple[str, Path]] = {}  # a run's identity -> the cell that runs it, its folder
        for cell in cells:
            where = " ".join(cell) or "(no overrides)"
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(cell))
                world, cuda = self.job_world_size(cfg), self.job_cuda(cfg)
                with open_dict(cfg):  # Hydra's runtime node is filled in by the job itself; not ours to check
                    del cfg["hydra"]
                run = validate(cfg)  # the typed config; cfg, Hydra's tree, names the run's folders
                if cfg.stage == "score" and cfg.mode == "distill" and not cfg.force:
                    if not trained(run_dir(cfg, world, cuda)):
                        raise ConfigError(
                            f"stage=score: {run_dir(cfg, world, cuda)} holds no trained student yet; "
                            "run the sweep with stage=train first"
                        )
            except ConfigError as err:
                errors.append(f"cell [{where}]: {err}")
                continue
            except Exception as err:  # composition: an unknown preset, a missing group option
                errors.append(f"cell [{where}]: {type(err).__name__}: {str(err).splitlines()[0]}")
                continue
            if self.skip_finished and is_finished(cfg, world, cuda):
                finished.append(f"{where} -> {run_dir(cfg, world, cuda)}")
                continue
            folder = run_dir(cfg, world, cuda) if cfg.stage == "train" else eval_dir(cfg, world, cuda)
            # one run, by its identity: the student under two seeds (no seed in it), two presets of one setting
            identity = run_identity(cfg, world, cuda) + ("" if cfg.stage == "train" else "/" + folder.name)
            if identity in first:
                same.append(f"{where} is [{first[identity][0]}] -> {first[identity][1]}")
                continue
            first[identity] = (where, folder)
            if not self.on_slurm():  # the job runs on this machine: it must have what the job needs
                try:
                    check_environment(run)
                except ConfigError as err:
                    errors.append(f"cell [{where}]: {err}")
                    continue
            todo.append(cell)
            self.done_checks[tuple(cell)] = finished_since(cfg, world, cuda, time.time())
        return todo, finished, same, errors

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        tic = time.perf_counter()
        cells = self.cells(arguments)
        todo, finished, same, errors = self.triage(cells)
        if errors:
            for line in errors:
                print(f"sekd: config error: {line}", file=sys.stderr)
            print(f"sekd: {len(errors)} of {len(cells)} cells are invalid; nothing was submitted", file=sys.stderr)
            sys.exit(2)
        repeats = f"{len(same)} the same run as another cell, " if same else ""
        print(
            f"sekd: {len(cells)} cells: {len(finished)} already finished, {repeats}{len(todo)} to run "
            f"(checked in {time.perf_counter() - tic:.1f} s)"
        )
        for line in finished:
            log.info("finished, skipped: %s", line)
        for line in same:
            log.info("runs once, skipped: %s", line)
        if not todo:
            print("sekd: nothing to do; every cell of this sweep is finished (force=true redoes them)")
            return []
        if self.on_slurm() and shutil.which("sbatch") is None:
            print(
                "sekd: config error: hydra/launcher=slurm submits with sbatch, which is not on this machine's PATH; "
                "run the sweep on a Slurm login node, start the local cluster (scripts/slurm-local.sh install), "
                "or use hydra/launcher=local",
                file=sys.stderr,
            )
            sys.exit(2)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        size = self.max_batch_size or len(todo)
        returns: List[Sequence[JobReturn]] = []
        failed: List[str] = []
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            results = self.launch_batch(batch, start, todo, len(failed))
            for cell, r in zip(batch, results):
                try:
                    _ = r.return_value  # raises the job's exception if it failed
                except BaseException as err:  # noqa: BLE001 - one cell's failure must not hide the others
                    failed.append(f"[{' '.join(cell)}]: {why_failed(err)}")
            returns.append(results)
        if failed:
            for line in failed:
                print(f"sekd: cell failed {line}", file=sys.stderr)
            print(
                f"sekd: {len(failed)} of {len(todo)} cells failed; the others' records are written. "
                "Re-run the sweep to retry only the unfinished cells.",
                file=sys.stderr,
            )
            sys.exit(1)
        return returns

    def launch_batch(
        self, batch: List[List[str]], start: int, todo: List[List[str]], failed: int
    ) -> Sequence[JobReturn]:
        """The launcher's results for a batch; on Slurm, a controller that does not answer while the batch is
        submitted or waited for ends the sweep in one line (exit 3) saying which cells are in which state."""
        assert self.launcher is not None
        jobs_dir = self.jobs_dir()
        before = job_folders(jobs_dir)
        watch = slurm_watch.ControllerWatch() if self.on_slurm() else None
        tic = time.monotonic()
        try:
            with (
                watch or nullcontext(),
                CellProgress([self.done_checks.get(tuple(c)) for c in batch], self.runs_elsewhere()),
            ):
                return self.launcher.launch(batch, initial_job_idx=start)
        except (Exception, slurm_watch.ControllerSilent) as err:
            silence = (watch.silence if watch else None) or slurm_watch.submission_silence(err, time.monotonic() - tic)
            if silence is not None:
                new = {i: job for job, i in job_folders(jobs_dir).items() if job not in before}
                self.controller_fault(
                    silence, todo, {tuple(batch[i]): job for i, job in new.items() if i < len(batch)}, failed
                )
            print(  # a job killed outright (OOM, scancel): submitit has no result for it
                f"sekd: a job of this sweep died without a result ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); jobs already submitted keep running and "
                "write their own records. Re-run the sweep to retry the unfinished cells.",
                file=sys.stderr,
            )
            sys.exit(1)

    def jobs_dir(self) -> Optional[Path]:
        """submitit's folder of job folders (`<job id>[_<array index>]`), on Slurm; None elsewhere."""
        folder = str(getattr(self.launcher, "params", {}).get("submitit_folder") or "")
        if not self.on_slurm() or not folder:
            return None
        return Path(*itertools.takewhile(lambda part: "%j" not in part, Path(folder).parts))

    def controller_fault(
        self, silence: Silence, todo: List[List[str]], held: Dict[tuple, str], failed: int
    ) -> NoReturn:
        from sekd.core.errors import FAULT_EXIT

        done = [c for c in todo if self.done_checks[tuple(c)]()]
        held = {cell: job for cell, job in held.items() if not self.done_checks[cell]()}
        waiting = len(todo) - len(done) - len(held) - failed
        ids = f"job ids {' '.join(sorted(held.values()))}" if held else "no job ids"
        print(
            f"sekd: run fault: the Slurm controller does not answer ({silence}); {len(done)} cells done, "
            + (f"{failed} failed, " if failed else "")
            + f"{len(held)} submitted ({ids}) still in Slurm's hands, {waiting} not submitted; start the controller "
            "(or wait for it) and re-run the same sweep: finished cells are skipped, a cell whose job ran on "
            "meanwhile is not trained twice, the rest are submitted",
            file=sys.stderr,
        )
        sys.exit(FAULT_EXIT)


def job_folders(jobs_dir: Optional[Path]) -> Dict[str, int]:
    """submitit's job folders under `jobs_dir`, each with the index of its cell in its batch: `<job id>_<i>`
    (array task i) or `<job id>` (a batch of one; an array's own folder, beside its tasks', is no cell)."""
    if jobs_dir is None or not jobs_dir.is_dir():
        return {}
    found = [m for m in (re.fullmatch(r"(\d+)(?:_(\d+))?", p.name) for p in jobs_dir.iterdir() if p.is_dir()) if m]
    arrays = {m.group(1) for m in found if m.group(2) is not None}
    return {m.group(0): int(m.group(2) or 0) for m in found if m.group(2) is not None or m.group(1) not in arrays}


def why_failed(err: BaseException) -> str:
    """A failed cell's cause in one line: a run fault or a bad input as the app words it, else the error's
    first line (a job's traceback stays in its log)."""
    from sekd.app.faults import CAUSES, as_fault
    from sekd.core.errors import ConfigError, RunFault

    if isinstance(err, ConfigError):
        return f"config error: {err}"
    fault = as_fault(err) if isinstance(err, Exception) else None
    if isinstance(fault, RunFault):
        return f"run fault: {fault}"
    if isinstance(fault, OSError):
        return f"run fault: {fault.filename}: {CAUSES.get(fault.errno or 0, fault.strerror)}"
    first = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"


def finished_since(cfg, world: Optional[int], cuda: Optional[bool], since: float) -> Callable[[], bool]:
    """Whether this cell's run has written what ends its stage since `since` (a forced re-run rewrites it)."""
    from sekd.stores.runs import run_dir, eval_dir, trained

    if cfg.stage == "train":
        folder = run_dir(cfg, world, cuda)
        return lambda: cfg.mode != "distill" or trained(folder)
    record = eval_dir(cfg, world, cuda) / "record.json"
    return lambda: record.exists() and record.stat().st_mtime >= since - 1


class CellProgress:
    """One bar over the cells of a batch that run elsewhere: it counts the cells whose records have appeared,
    polled from their folders every few seconds while the launcher waits for them."""

    def __init__(self, checks: List[Optional[Callable[[], bool]]], show: bool, every: float = 2.0) -> None:
        self.checks = [c for c in checks if c is not None]
        self.show, self.every = show and bool(self.checks), every
        self.stop = threading.Event()

    def __enter__(self) -> "CellProgress":
        if self.show:
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=len(self.checks), desc="sekd: cells finished", unit="cell") as bar:
            while True:
                done = sum(1 for check in self.checks if check())
                if done > bar.n:
                    bar.update(done - bar.n)
                else:
                    bar.refresh()  # the elapsed time moves while a long cell runs
                if done == len(self.checks) or self.stop.wait(self.every):
                    return

    def __exit__(self, *exc) -> None:
        if self.show:
            self.stop.set()
            self.thread.join()
