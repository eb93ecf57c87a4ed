"""The run folder: the one place that writes a run's config, metrics, checkpoints, model and record.

    <paths.root>/runs/<preset>-s<seed>-<train hash>/          (everything but `eval` is hashed, names
                                                               not; a run that trains nothing: <preset>-<hash>)
        metrics.jsonl  checkpoint.pt  selection_trace.jsonl  train_stats.json  .train.lock
        model/  (Hugging Face checkpoint)   wandb/
        eval-<suite>-<split>-<eval hash>/   config.yaml  overrides.yaml  record.json  lm_eval/ (raw output)

One trained student is scored by as many eval configs as ask for it (Table 2 on test, V1 on
validation) without training it again; each scoring writes its own record. A run is its identity
(its seed and config hashes, defined here), found whatever route's preset named its folder.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from sekd.core.artifacts import content_key
from sekd.core.errors import RunFault
from sekd.core.files import append_lines, atomic_write_json, atomic_write_text, sweep_tmp

# Keys that do not change a run's result: left out of the config hash that names its folder.
UNHASHED = (
    "paths",
    "logging",
    "resources",
    "force",
    "stage",
    "hydra",
    "train.device",
    "train.threads",
    "train.distributed",
    "train.fsdp",
    "train.profile_steps",
    "model.teacher_device",
    "train.log_every",
    "train.chunk_size",
    "eval.batch_size",
    "eval.device",
    "preset",
    "label",
    "plugins",  # which modules are imported moves nothing; a plugin piece the run uses does (`_hash`)
)
# Keys the schema (sekd/config/schema.py) declares that some group's YAML leaves out (model.task: only the embedded
# pair has one): null there means what the key's absence meant, so it is left out of the hash too, and the
# schema moved no run folder.
NULL_IS_ABSENT = ("model.task",)


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p) or {}
    tree.pop(leaf, None)


def resolved(cfg: DictConfig, keep_env: bool = False) -> dict[str, Any]:
    """The run's config as plain data, without Hydra's own node. `keep_env`: what records, config files
    and wandb get: a value read from the environment (${oc.env:NAME,default}, maybe a token) stays that
    text, in every value that interpolates it too. Hashes use the resolved values, as they always did."""
    if keep_env:
        cfg = _env_as_text(cfg)
    tree = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # a DictConfig's: a dict by name
    tree.pop("hydra", None)
    return tree


def _env_as_text(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose values that read ${oc.env:...} are their own text (escaped, so it is not
    resolved again)."""
    import copy

    from omegaconf import ListConfig, open_dict, read_write

    cfg = copy.deepcopy(cfg)

    def walk(node) -> None:
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                if not child._is_none() and not child._is_missing() and not child._is_interpolation():
                    walk(child)
                continue
            raw = child._value()
            if isinstance(raw, str) and "oc.env" in raw:
                with open_dict(node), read_write(node):
                    node[key] = raw.replace("${", "\\${")

    walk(cfg)
    return cfg


def launched_world_size() -> int:
    """How many ranks this process's launcher started (torchrun, Slurm tasks); 1 for a plain process."""
    from sekd.distributed.launch import from_env

    return from_env().world_size


def _global_micro_batch(tree: dict, world: int | None) -> dict:
    """train.micro_batch_size is per rank: W ranks x m sequences see exactly what one process sees with
    W*m (docs/method.md §9), so the hash names the global micro-batch. One process hashes as it always did;
    a 2-rank run never shares a folder with a 1-rank run of half its batch."""
    world = launched_world_size() if world is None else world
    train = tree.get("train") or {}
    if world > 1 and isinstance(train.get("micro_batch_size"), int):
        train["micro_batch_size"] *= world
    return tree


def _seedless(tree: dict) -> dict:
    """A run that trains nothing (mode=score_student / score_teacher) scores the same model whatever the
    seed: eval.seed, fixed across training seeds, seeds lm-eval. So its identity holds no seed, and the
    cells of a sweep over seeds share one folder: scored once, not once per seed."""
    if tree.get("mode", "distill") != "distill":
        tree.pop("seed", None)
    return tree


def trains(cfg: DictConfig) -> bool:
    return cfg.mode == "distill"


def on_cuda(device: str, cuda: bool | None = None) -> bool:
    """Whether a `train.device` / `eval.device` value computes on a GPU: auto means one where there is one.
    `cuda`: whether the machine the run lands on has one (None: this process's; a sweep that submits to
    Slurm knows it from the job's resources)."""
    if device == "auto":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return bool(cuda)
    return str(device).startswith("cuda")


def _compute(tree: dict, cuda: bool | None) -> dict:
    """The precision a run computes in, resolved, in place of the words that name it: train.precision=auto
    is bf16 on a GPU and fp32 on a CPU, and scoring is bf16 on a GPU (sekd.app.scoring). A CPU fp32 run and
    a GPU bf16 run of one preset have different numbers, so they must not share a folder or a record; a
    device that computes in the same precision (cuda:0 or cuda:1, 1 card or 8) does not move the hash."""
    train = tree.get("train")
    if isinstance(train, dict) and train.get("precision") == "auto":
        train["precision"] = "bf16" if on_cuda(str(train.get("device", "auto")), cuda) else "fp32"
    ev = tree.get("eval")
    if isinstance(ev, dict) and ev.get("suite", "none") != "none":
        ev["precision"] = "bf16" if on_cuda(str(ev.get("device", "auto")), cuda) else "fp32"
    return tree


def _hash(tree: dict) -> str:
    from sekd.plugins import used

    pieces = used(tree)
    if pieces:  # a plugin's piece: its source is part of the run (a run of built-ins keeps its hash)
        tree["plugin_pieces"] = [{k: p[k] for k in ("key", "module", "source")} for p in pieces]
    _seedless(tree)
    for key in UNHASHED:
        _drop(tree, key)
    for key in NULL_IS_ABSENT:
        group, _, leaf = key.rpartition(".")
        if leaf in (tree.get(group) or {}) and tree[group][leaf] is None:
            _drop(tree, key)
    return content_key(tree, 12)


def config_hash(cfg: DictConfig, world: int | None = None, cuda: bool | None = None) -> str:
    """Hash of the resolved config minus the keys that cannot change the result: names one record.
    `world`: the run's number of ranks (None: as this process was launched); `cuda`: whether its machine
    has a GPU (None: this one's), which resolves precision auto (`_compute`)."""
    return _hash(_compute(_global_micro_batch(resolved(cfg), world), cuda))


def train_hash(cfg: DictConfig, world: int | None = None, cuda: bool | None = None) -> str:
    """The same without `eval`: names the run folder, so one trained student serves every scoring."""
    tree = resolved(cfg)
    tree.pop("eval", None)
    return _hash(_compute(_global_micro_batch(tree, world), cuda))


def eval_hash(cfg: DictConfig, cuda: bool | None = None) -> str:
    """Hash of the scoring config alone (its hashed keys): names the scores folder inside a run."""
    return _hash(_compute({"eval": resolved(cfg).get("eval", {})}, cuda))[:8]


def run_dir(cfg: DictConfig, world: int | None = None, cuda: bool | None = None) -> Path:
    """The run's folder, found by its identity: an existing `*-s<seed>-<train hash>` (`*-<hash>` for a run
    that trains nothing, `_seedless`) whatever route made it; else a new `<preset>-s<seed>-<train hash>`.
    The run's name (`run_name`: the preset and what its overrides change) is the console's, the record's
    and the report's; the folder keeps its preset's, short and the same whatever was overridden."""
    identity = run_identity(cfg, world, cuda)
    runs = Path(cfg.paths.root) / "runs"
    return existing_run(runs, identity) or runs / f"{cfg.preset}{identity}"


def run_identity(cfg: DictConfig, world: int | None = None, cuda: bool | None = None) -> str:
    """What ends the run's folder name and makes it that run: `-s<seed>-<train hash>`, or `-<train hash>` for a
    run that trains nothing. Two routes (presets, overrides) to the same settings have one identity."""
    return (f"-s{cfg.seed}" if trains(cfg) else "") + f"-{train_hash(cfg, world, cuda)}"


def existing_run(runs: Path, identity: str) -> Path | None:
    """The folder under `runs` whose name ends in `identity` (`-s<seed>-<hash>` or `-<hash>`); a seedless
    identity never takes a seeded folder. Several (routes that started at once): the trained one, then the
    first by name, so every route and the sweeper pick the same."""
    if not runs.is_dir():
        return None
    seeded = re.compile(r"-s-?\d+-[0-9a-f]+$")
    found = sorted(
        p for p in runs.glob(f"*{identity}") if p.is_dir() and (identity.startswith("-s") or not seeded.search(p.name))
    )
    return next((p for p in found if trained(p)), found[0] if found else None)


def eval_dir(cfg: DictConfig, world: int | None = None, cuda: bool | None = None) -> Path:
    folder = run_dir(cfg, world, cuda)
    return folder / f"eval-{cfg.eval.suite}-{cfg.eval.split}-{eval_hash(cfg, cuda)}"


# ---- a run's name: its preset and what its overrides change -------------------------------------------

# Overrides that choose, not change: the preset itself, the seed a row averages over, and the profile (the
# scale a sweep runs every row at: the report tells profiles apart by model.name).
NOT_NAMING = ("experiment", "seed", "profile")


def override_key(override: str) -> str:
    """'+position.options.tau=2' -> 'position.options.tau'; 'hydra/launcher=local' -> 'hydra.launcher';
    '~train.lr' -> 'train.lr'."""
    return override.split("=", 1)[0].lstrip("+~").strip().replace("/", ".")


def covers(key: str, other: str) -> bool:
    """Does setting `key` (a value or a whole group) set `other`? `model` covers `model.name`."""
    return other == key or other.startswith(key + ".")


def changes(overrides: list[str]) -> list[str]:
    """The overrides, as typed, that change a hashed key (`UNHASHED`, `NOT_NAMING` and Hydra's own do not),
    each key once (the last one typed wins, as in Hydra)."""
    kept: dict[str, str] = {}
    for override in overrides:
        key = override_key(override)
        if any(covers(k, key) for k in (*UNHASHED, *NOT_NAMING)):
            continue
        kept.pop(key, None)
        kept[key] = override.strip()
    return list(kept.values())


def run_name(preset: str, overrides: list[str]) -> str:
    """`se_kd` for the preset as it is; `se_kd (position.signal=kl, train.steps=2)` for a run whose
    overrides change its settings."""
    changed = changes(overrides)
    return f"{preset} ({', '.join(changed)})" if changed else preset


def file_safe(name: str, limit: int = 80) -> str:
    """`name` as a wandb run id (which refuses `,:;#?/'`) or a file name: `se_kd (position.signal=kl,
    train.steps=2)` -> `se_kd_position.signal=kl_train.steps=2`; at most `limit` characters (the identity
    that follows it keeps it unique)."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_.=+-") or "run"
    if len(safe) > limit:  # whole overrides only, where one ends in the second half
        cut = safe[: limit + 1].rfind("_")
        safe = safe[: cut if cut > limit // 2 else limit]
    return safe.rstrip("_.=+-")  # no separator left before the identity that follows


class RunDir:
    def __init__(self, cfg: DictConfig, overrides: list[str] | None = None):
        self.path = run_dir(cfg)
        self.eval_dir = self.path / f"eval-{cfg.eval.suite}-{cfg.eval.split}-{eval_hash(cfg)}"
        self.hash = config_hash(cfg)
        self.name = run_name(cfg.preset, overrides or [])  # the console's, wandb's, the record's
        # nothing is created yet: write_config makes the folders once the run's checks have passed

    record = property(lambda self: self.eval_dir / "record.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    model = property(lambda self: self.path / "model")
    lm_eval = property(lambda self: self.eval_dir / "lm_eval")
    train_stats = property(lambda self: self.path / "train_stats.json")
    trace = property(lambda self: self.path / "selection_trace.jsonl")

    def done(self) -> bool:
        return self.record.exists()

    def trained(self) -> bool:
        return trained(self.path)

    def write_config(self, cfg: DictConfig, overrides: list[str]) -> None:
        """The full config (eval included) beside the record it produces; creates the run's folders."""
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        recorded = resolved(cfg, keep_env=True)  # ${oc.env:...} values stay text: no token lands in a file
        atomic_write_text(self.eval_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(recorded)))
        atomic_write_text(self.eval_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))

    def log_metrics(self, row: dict[str, Any]) -> None:
        self.require()
        append_lines(self.metrics, json.dumps(row) + "\n")

    def require(self) -> None:
        """The run folder is still there: one removed under a running job took its checkpoint and metrics
        with it, and writing on would make a folder that looks whole and is not."""
        if not self.path.is_dir():
            raise RunFault(f"{self.path}: the run folder was removed while the run worked")

    def truncate_after(self, step: int) -> None:
        """On resume: forget the metrics logged after the checkpoint we went back to, and the trace
        rows of the steps that will be redone (the trace counts steps from 0, metrics from 1). Only
        whole lines count: a line a full disk cut short is dropped."""
        for path, keep in ((self.metrics, lambda s: s <= step), (self.trace, lambda s: s < step)):
            if path.exists():
                lines = path.read_text().split("\n")[:-1]  # the last piece has no newline: not a whole line
                rows = [ln for ln in lines if ln and keep(json.loads(ln)["step"])]
                atomic_write_text(path, "".join(r + "\n" for r in rows))

    def start_over(self) -> None:
        """force=true: train from scratch; the checkpoint, metrics and trace of an earlier attempt go."""
        self.checkpoint.unlink(missing_ok=True)
        self.truncate_after(0)

    def sweep(self) -> None:
        """Delete the temporary files a killed writer left in the run and scores folders (held under the
        run's training lock, so no live writer of the run folder is interrupted)."""
        for folder in (self.path, self.eval_dir):
            if folder.is_dir():
                sweep_tmp(folder)

    def write_record(self, record: dict[str, Any]) -> None:
        self.require()
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record, record)


def trained(path: Path) -> bool:
    """The distilled student is saved in the run folder `path` (training finished), scored or not.
    The one "is this run trained?" check: the app, is_finished and the sweeper ask it."""
    return (path / "model" / "config.json").exists() and (path / "train_stats.json").exists()


def is_finished(cfg: DictConfig, world: int | None = None, cuda: bool | None = None) -> bool:
    """Whether this cell has nothing left to do for its stage (a sweep skips it before submitting).
    Reads only the file system: creates nothing. `world`, `cuda`: the ranks the cell's job will run on,
    and whether its node has a GPU."""
    if cfg.force:
        return False
    if cfg.stage == "train":
        return cfg.mode != "distill" or trained(run_dir(cfg, world, cuda))
    return (eval_dir(cfg, world, cuda) / "record.json").exists()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
