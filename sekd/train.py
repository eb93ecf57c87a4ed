"""`sekd-train` (also `python -m sekd.train`): one run = compose -> train -> score -> record (sekd/app).

sekd-train experiment=se_kd seed=1338
sekd-train -m experiment=full_kd,random_pos,se_kd seed=1337,1338,1339
sekd-train experiment=se_kd model=qwen3_8b_to_1.7b train=paper --plan --card 80GB   # will it fit?
sekd-train --config-name demo          # a sweep of sweeps/ (shipped in the package), from any folder
sekd-train --version
"""

from __future__ import annotations

import sys
from typing import cast

import hydra
from omegaconf import DictConfig, OmegaConf

from sekd.app import execute, skip_exit_collection
from sekd.app.compose import fail
from sekd.config.folders import CONF
from sekd.core.errors import ConfigError


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def app(cfg: DictConfig) -> None:
    """The Hydra app: one job, or one cell of a multirun (in this process, or in a Slurm job's)."""
    from hydra.core.hydra_config import HydraConfig

    skip_exit_collection()  # a submitit job's process (Slurm, hydra/launcher=local) runs the app without main()
    # as typed: reading the items would resolve an ${oc.env:...} in them, and the records must not hold it
    overrides = cast(list[str], OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))
    execute(cfg, overrides)


def main() -> None:
    """`sekd-train`: a bad command line (an unknown key, a value out of range) stops with one line and
    exit status 2 before Hydra starts a job or makes its folder; then Hydra runs the app. With --plan
    (and --card, --world) it prints the run's memory per device instead (sekd/app/plan.py), before Hydra
    sees argv: Hydra refuses flags it does not know."""
    from sekd.app.checks import check_command_line
    from sekd.plugins import pass_on

    skip_exit_collection()
    pass_on()  # a wrapper's own modules of pieces, to every process this command starts
    if "--version" in sys.argv[1:]:  # sekd's own (Hydra's --version would print Hydra's)
        from sekd import __version__

        print(f"sekd {__version__}")
        return
    if "--plan" in sys.argv[1:]:
        from sekd.app.plan import main as plan

        sys.exit(plan([a for a in sys.argv[1:] if a != "--plan"]))
    try:
        check_command_line(sys.argv[1:], CONF, "config")
    except ConfigError as err:
        fail(err)
    sys.argv += other_rank_overrides(sys.argv[1:])
    app()


def other_rank_overrides(args: list[str]) -> list[str]:
    """Ranks other than 0 (a launcher started several) write no shared file, Hydra's included: their
    Hydra output (a run's folder; a multirun's sweep folder, its multirun.yaml and job folders) goes to a
    folder of their own under the system's temporary directory, unlogged. Every rank runs every cell of
    a multirun, one after another, joining each cell's process group and leaving it at the cell's end."""
    import tempfile

    from sekd.distributed.launch import from_env

    try:
        rank = from_env().rank
    except ConfigError:
        return []  # a broken launcher environment is refused, in one line, once the run composes
    if rank == 0:
        return []
    own = tempfile.mkdtemp(prefix=f"sekd-rank{rank}-")
    multirun = any(a in ("-m", "--multirun") for a in args)
    return ["hydra/job_logging=disabled", f"hydra.sweep.dir={own}" if multirun else f"hydra.run.dir={own}"]


if __name__ == "__main__":
    main()
