"""wandb, offline by default, with every file it writes kept inside the run folder."""

from __future__ import annotations

import os
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
        self.run = None
        if mode == "disabled":
            return
        wdir = Path(run_path).resolve()
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

        self.run = wandb.init(
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

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(row, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
