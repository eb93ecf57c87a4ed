"""sekd-cache: build, verify, list and measure an offline teacher cache (docs/method.md §9).

sekd-cache build --out <dir> [--kind NAME[:K=V,...] ...] [--num-shards 8 --worker I --num-workers W] [OVERRIDE ...]
    OVERRIDEs are sekd-train's (e.g. experiment=se_kd3x data=fineweb_edu seed=1338): teacher, tokenizer, data,
    T, seed, device and precision are the run's; the kind is the run's classes (default rs_kd), or each
    --kind (one teacher pass; several kinds go to <dir>/<name>.<k>-<v>..., one cache each)
sekd-cache verify <dir>          exit 0 and one OK line, or exit 1 and the one-line reason
sekd-cache ls <dir>              kind, signature and shards table
sekd-cache stats <dir> [<dir> ...] [--tokens 100e9]   kind and bytes per position of each; the paper's Table 6
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sekd.core.errors import FAULT_EXIT

from sekd.stores.teacher_cache.store import (
    MANIFEST,
    CacheError,
    TeacherCache,
    read_manifest,
    shard_name,
    storage_markdown,
    storage_rows,
)

if TYPE_CHECKING:
    import torch

    from sekd.stores.teacher_cache.kinds import CacheKind


class BuildConfigError(ValueError):
    """A build refused before any work: bad overrides or a bad config (exit 2, as sekd-train's)."""


def run_config(overrides: list[str]):
    """The run's config composed and validated exactly as sekd-train does, with classes=rs_kd unless the
    overrides choose the classes group themselves."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sekd.core.errors import ConfigError

    from sekd.app.checks import check_command_line, typed
    from sekd.config.folders import CONF

    if not any(o.lstrip("+~").startswith("classes=") for o in overrides):
        overrides = ["classes=rs_kd", *overrides]  # before the run's own, so it may still set classes.options
    try:
        check_command_line(overrides, CONF, "config")  # composed and validated, one line naming the key
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        raise BuildConfigError(" ".join(str(err).split()) or type(err).__name__) from None
    return typed(cfg)  # validated above: the typed config the build reads, as training does


def build_kinds(cfg, specs: list[str], out: Path) -> dict[Path, CacheKind]:
    """folder -> kind: the run's classes in `out`, one --kind in `out`, several each in out/<label>."""
    from sekd.stores.teacher_cache.kinds import KindError, cache_kind, parse_kind

    try:
        kinds = [parse_kind(s) for s in specs] or [cache_kind(cfg.classes.name, dict(cfg.classes.options))]
    except KindError as err:
        raise BuildConfigError(str(err)) from None
    if len(kinds) == 1:
        return {out: kinds[0]}
    folders = {out / k.label(): k for k in kinds}
    if len(folders) < len(kinds):
        raise BuildConfigError(f"--kind: a kind is named twice ({', '.join(k.label() for k in kinds)})")
    return folders


def cmd_build(args: argparse.Namespace) -> int:
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # the packer's and the model loader's bars too
    cfg = run_config(args.overrides)
    outs = build_kinds(cfg, args.kind, args.out)
    import torch

    from sekd.stores.teacher_cache.build import build_caches, worker_shards
    from sekd.core.errors import ConfigError
    from sekd.models.loading import (
        check_same_tokenizer,
        load_model,
        pick_device,
        pick_dtype,
        resolve_pair,
        shared_vocab,
    )
    from sekd.app.compose import job_threads
    from sekd.app.training import training_data
    from sekd.data.dataset import tokenizer_signature
    from sekd.models.loading import model_signature

    threads = job_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
    try:  # the trainer's own steps: pair, tokenizer, packed train split
        shards = worker_shards(args.num_shards, args.worker, args.num_workers)
        teacher_path, student_path, tok_path = resolve_pair(cfg)
        tok = check_same_tokenizer(teacher_path, student_path, tok_path, cfg.model.trust_remote_code)
        data = training_data(cfg, tok)
        device = worker_device(pick_device(cfg.train.device), args.worker)
    except (ConfigError, ValueError) as err:
        raise BuildConfigError(str(err)) from None
    teacher = load_model(teacher_path, device, pick_dtype(cfg.train.precision, device), cfg.model.trust_remote_code)
    mans = build_caches(  # the signature fields as training's cache_expectation gives them
        teacher,
        data,
        outs,
        teacher_name=model_signature(teacher_path),
        tokenizer_sig=tokenizer_signature(tok),
        temperature=float(cfg.train.temperature),
        seed=int(cfg.seed),
        num_shards=args.num_shards,
        batch_size=args.batch_size or int(cfg.samples.batch_size),
        device=device,
        vocab_size=shared_vocab(tok, teacher),
        shards=shards,
        progress=not args.quiet,
    )
    for out, man in mans.items():
        print(
            f"{out}: {len(man['shards'])}/{args.num_shards} shards built"
            + (
                f"; train with {outs[out].overrides()} classes.cache={out} and the same overrides"
                if man["complete"]
                else " (other workers' shards still missing)"
            )
        )
    return 0


def worker_device(device: torch.device, worker: int, visible: int | None = None) -> torch.device:
    """Worker I's device: on CUDA, card I mod the cards it sees (sekd.distributed.launch.card_index), so W workers on one
    node spread over its cards instead of each loading the teacher on cuda:0; a worker bound to one card
    sees only that one. `visible`: the card count (None: this process's)."""
    import torch

    from sekd.distributed.launch import card_index

    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count() if visible is None else visible
    return torch.device("cuda", card_index(worker, count))


def cmd_verify(args: argparse.Namespace) -> int:
    cache = TeacherCache.open(args.dir, verify=True)
    s = cache.stats()
    print(
        f"OK {args.dir}: {cache.num_shards} shards, {s['samples']} samples, {s['positions']} positions, "
        f"{s['bytes']} bytes, checksums and blocks verified"
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    man = read_manifest(Path(args.dir))
    sig = man["signature"]
    state = "complete" if man.get("complete") else "INCOMPLETE"
    holds = f"{sig.get('kind')}: {sig.get('records')} records, form {sig.get('form')}"
    print(f"# {args.dir}  ({state}, {man.get('samples')} samples; {holds})")
    for key in sorted(sig):
        print(f"{key:>14}: {sig[key]}")
    print("\n| shard | file | samples | positions | records | bytes | sha256 |")
    print("|---:|---|---:|---:|---:|---:|---|")
    entries = {e["index"]: e for e in man["shards"]}
    for i in range(sig["num_shards"]):
        e = entries.get(i)
        if e is None:
            print(f"| {i} | {shard_name(i, sig['num_shards'])} | missing | | | | |")
        else:
            print(
                f"| {i} | {e['file']} | {e['samples']} | {e['positions']} | {e['records']} | {e['bytes']} | {e['sha256'][:16]} |"
            )
    return 0


def cache_folders(dirs: list[Path]) -> list[Path]:
    """Each folder that is a cache; a folder without a manifest whose subfolders are caches (a multi-kind
    build's) stands for them."""
    out = []
    for d in dirs:
        inner = sorted(p.parent for p in Path(d).glob(f"*/{MANIFEST}"))
        out += [d] if (Path(d) / MANIFEST).exists() or not inner else inner
    return out


def cmd_stats(args: argparse.Namespace) -> int:
    caches = [(d, TeacherCache.open(d)) for d in cache_folders(args.dir)]
    print("| cache | kind | form | B / record | classes / position | B / position (files) | B / position (records) |")
    print("|---|---|---|---:|---:|---:|---:|")
    measured = []
    for d, cache in caches:
        s = cache.stats()
        measured.append(s)
        print(
            f"| {d} | {s['kind']} | {s['form']} | {s['bytes_per_record']} | {s['distinct_per_position']:.2f} | "
            f"{s['bytes_per_position']:.2f} | {s['record_bytes_per_position']:.2f} |"
        )
    print(
        f"\n{measured[0]['positions']} positions; files: shards whole (records, lens, tails, valid bits, index); "
        "records: the records and a tail form's tail masses alone\n"
    )
    rows = storage_rows(
        args.vocab_size or measured[0]["vocab_size"], tokens=args.tokens, sample_fraction=args.sample_fraction
    )
    for s in measured:
        rows += storage_rows(s["vocab_size"], tokens=args.tokens, measured=s)[-2:]
    print(storage_markdown(rows, args.tokens))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sekd-cache", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser(
        "build",
        help="run the teacher once and write the class targets of a run's training data",
        description="Build (or resume) the cache a sekd-train run with the same OVERRIDEs reads "
        "with classes.cache=<out>: same teacher, tokenizer, packed data, class sampler, T and seed.",
    )
    b.add_argument("--out", type=Path, required=True)
    b.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="NAME[:K=V,...]",
        help="a class sampler to cache, e.g. top_k_tail:top=20 (repeat for several, one teacher pass; "
        "default: the run's classes)",
    )
    b.add_argument("--num-shards", type=int, default=8)
    b.add_argument("--worker", type=int, default=0, help="this worker's index (builds shards I, I+W, ...)")
    b.add_argument("--num-workers", type=int, default=1)
    b.add_argument("--batch-size", type=int, default=0, help="teacher batch size (0: samples.batch_size)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="sekd-train overrides, e.g. experiment=se_kd3x model=tiny data=fineweb_edu seed=1338",
    )
    b.set_defaults(fn=cmd_build)

    v = sub.add_parser("verify", help="check every shard's checksum and decodability")
    v.add_argument("dir", type=Path)
    v.set_defaults(fn=cmd_verify)

    ls = sub.add_parser("ls", help="signature and shards")
    ls.add_argument("dir", type=Path)
    ls.set_defaults(fn=cmd_ls)

    st = sub.add_parser("stats", help="kind and bytes per position of each cache; the paper's Table 6 projection")
    st.add_argument("dir", type=Path, nargs="+", help="cache folders (a multi-kind build's folder: its kinds)")
    st.add_argument("--tokens", type=float, default=100e9)
    st.add_argument("--sample-fraction", type=float, default=0.2, help="SE-KD3X sample budget l")
    st.add_argument("--vocab-size", type=int, default=None, help="|V| of the Full KD row (default: the cache's)")
    st.set_defaults(fn=cmd_stats)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except BuildConfigError as e:
        print(f"sekd-cache {args.cmd}: config error: {e}", file=sys.stderr)
        return 2
    except CacheError as e:
        print(f"sekd-cache {args.cmd}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        line = fault_line(e)
        if line is None or os.environ.get("SEKD_TRACEBACK", "") not in ("", "0"):
            raise  # a bug (or a traceback asked for): the traceback
        print(f"sekd-cache {args.cmd}: run fault: {line}", file=sys.stderr)
        return FAULT_EXIT


def fault_line(err: BaseException) -> str | None:
    """A full, read-only or vanished disk under the cache as one line (sekd-train's words), or None for a bug.
    The manifest enters a shard only once it is whole, so the same command keeps those and builds the rest."""
    from sekd.app.faults import CAUSES, REMEDIES, free_space
    from sekd.core.files import storage_error

    fault = storage_error(err)
    if fault is None or fault.errno not in CAUSES:
        return None
    free = free_space(fault.filename, fault.errno)
    cause = CAUSES[fault.errno] + (f" ({free})" if free else "")
    return (
        f"{fault.filename or 'the cache'}: {cause}; {REMEDIES[fault.errno]} and re-run the same command: "
        "the shards already whole are kept, the rest are built"
    )


if __name__ == "__main__":
    sys.exit(main())
