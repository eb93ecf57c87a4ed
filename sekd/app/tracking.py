"""wandb, offline by default, with every file it writes kept inside the run folder.

wandb is a side channel: metrics.jsonl keeps every step. A wandb that fails (its service process dies, its
folder fills or turns read-only, wandb.init itself fails) says so in one line, once, and the run goes on
without it; a fault of wandb at the end never hides the run's own fault line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, cast


class Tracker:
    def __init__(
        self,
        mode: str,
        run_path: Path,
        *,
        name: str,
        config: dict[str, Any],
        project: str,
        entity: str | None = None,
        group: str | None = None,
        run_id: str | None = None,
    ):
        self.run: Any = None
        if mode == "disabled":
            return
        try:
            self.run = start_wandb(
                mode,
                Path(run_path),
                name=name,
                config=config,
                project=project,
                entity=entity,
                group=group,
                run_id=run_id,
            )
        except Exception as err:  # a side channel: the run goes on without it
            self.stopped(err, "wandb did not start")

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            try:
                self.run.log(row, step=step)
            except Exception as err:
                self.stopped(err)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                for k, v in metrics.items():
                    self.run.summary[k] = v
            except Exception as err:
                self.stopped(err)

    def finish(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish()
            except (Exception, SystemExit) as err:  # wandb may sys.exit with its service's code
                self.stopped(err)

    def stopped(self, err: BaseException, what: str = "wandb stopped logging") -> None:
        """The one line, once; wandb is not called again, and its exit hook (which would print the same
        broken connection's traceback at exit) is torn down now, quietly."""
        self.run = None
        from tqdm import tqdm

        # tqdm.write: a line of its own, above a progress bar that is drawn at the time
        tqdm.write(
            f"sekd: {what} ({cause(err)}); the run goes on without it, metrics.jsonl keeps every step", sys.stderr
        )
        if "wandb" in sys.modules:
            try:
                sys.modules["wandb"].teardown()
            except (Exception, SystemExit):  # the same broken service: already said
                pass


def cause(err: BaseException) -> str:
    """A few words: an OSError's text and file, else the error's first line (its type where it has none)."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def start_wandb(
    mode: str,
    run_path: Path,
    *,
    name: str,
    config: dict[str, Any],
    project: str,
    entity: str | None,
    group: str | None,
    run_id: str | None,
) -> Any:
    wdir = run_path.resolve()
    for var, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", "wandb/cache"),
        ("WANDB_DATA_DIR", "wandb/data"),
        ("WANDB_CONFIG_DIR", "wandb/config"),
    ):
        (wdir / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(wdir / sub)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        project=project,
        entity=entity,
        group=group,
        name=name,
        id=run_id,
        resume="allow",
        config=config,
        mode=cast(Literal["online", "offline"], mode),  # the schema's logging.wandb choice, less disabled
        dir=str(wdir),
        reinit="finish_previous",
    )
