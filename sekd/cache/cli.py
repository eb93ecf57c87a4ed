"""sekd-cache: build, verify, list and measure an offline teacher cache (docs/method.md §9).

    sekd-cache build --teacher <HF folder> --data embedded --split train --seq-len 128 --out <dir>
                     [--n-draws 64 --temperature 1 --seed 0 --num-shards 8 --worker I --num-workers W]
    sekd-cache verify <dir>          exit 0 and one OK line, or exit 1 and the one-line reason
    sekd-cache ls <dir>              signature and shards table
    sekd-cache stats <dir> [--tokens 100e9] [--sample-fraction 0.2]   the paper's Table 6, measured
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sekd.cache.store import CacheError, TeacherCache, read_manifest, shard_name, storage_markdown, storage_rows


def cmd_build(args: argparse.Namespace) -> int:
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # the packer's and the model loader's bars too
    import torch

    from sekd.cache.build import build_cache, worker_shards
    from sekd.data.dataset import build_packed, tokenizer_signature
    from sekd.models import model_signature
    from sekd.models import load_model, load_tokenizer, pick_device, pick_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.teacher)
    data = build_packed(args.data, args.split, tok, seq_len=args.seq_len, token_budget=args.token_budget,
                        cache_dir=Path(args.cache) / "data")
    device = pick_device(args.device)
    teacher = load_model(args.teacher, device, pick_dtype(args.precision, device))
    shards = worker_shards(args.num_shards, args.worker, args.num_workers)
    man = build_cache(teacher, data, args.out, teacher_name=args.teacher_name or model_signature(args.teacher),
                      tokenizer_sig=tokenizer_signature(tok), n_draws=args.n_draws, temperature=args.temperature,
                      seed=args.seed, num_shards=args.num_shards, batch_size=args.batch_size, device=device,
                      vocab_size=len(tok), shards=shards, progress=not args.quiet)
    done = len(man["shards"])
    print(f"{args.out}: {done}/{args.num_shards} shards built"
          + ("" if man["complete"] else " (other workers' shards still missing)"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cache = TeacherCache.open(args.dir, verify=True)
    s = cache.stats()
    print(f"OK {args.dir}: {cache.num_shards} shards, {s['samples']} samples, {s['positions']} positions, "
          f"{s['bytes']} bytes, checksums and blocks verified")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    man = read_manifest(Path(args.dir))
    sig = man["signature"]
    print(f"# {args.dir}  ({'complete' if man.get('complete') else 'INCOMPLETE'}, {man.get('samples')} samples)")
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
            print(f"| {i} | {e['file']} | {e['samples']} | {e['positions']} | {e['records']} | {e['bytes']} | {e['sha256'][:16]} |")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    cache = TeacherCache.open(args.dir)
    s = cache.stats()
    print(f"# {args.dir}: {s['positions']} positions, {s['records']} records ({s['bytes_per_record']} B each), "
          f"{s['bytes']} bytes; {s['distinct_per_position']:.2f} distinct classes per position of N={s['n_draws']}; "
          f"{s['bytes_per_position']:.2f} B/position (records alone {s['record_bytes_per_position']:.2f})\n")
    rows = storage_rows(args.vocab_size or s["vocab_size"], tokens=args.tokens,
                        sample_fraction=args.sample_fraction, measured=s)
    print(storage_markdown(rows, args.tokens))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sekd-cache", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="run the teacher once and write the RS-KD draws")
    b.add_argument("--teacher", required=True, help="HF model folder (or hub name) holding the teacher and its tokenizer")
    b.add_argument("--teacher-name", default=None, help="name recorded in the signature (default: the teacher's content signature, as training checks it)")
    b.add_argument("--data", default="embedded", help="data source name (sekd.data.sources)")
    b.add_argument("--split", default="train")
    b.add_argument("--seq-len", type=int, required=True)
    b.add_argument("--token-budget", type=float, default=None)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--cache", default=os.environ.get("SEKD_CACHE_DIR", ".sekd_cache"),
                   help="harness cache folder; packed data goes to <cache>/data")
    b.add_argument("--n-draws", type=int, default=64)
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--num-shards", type=int, default=8)
    b.add_argument("--worker", type=int, default=0, help="this worker's index (builds shards I, I+W, ...)")
    b.add_argument("--num-workers", type=int, default=1)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--device", default="auto")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)

    v = sub.add_parser("verify", help="check every shard's checksum and decodability")
    v.add_argument("dir", type=Path)
    v.set_defaults(fn=cmd_verify)

    ls = sub.add_parser("ls", help="signature and shards")
    ls.add_argument("dir", type=Path)
    ls.set_defaults(fn=cmd_ls)

    st = sub.add_parser("stats", help="bytes per position and the paper's Table 6 projection")
    st.add_argument("dir", type=Path)
    st.add_argument("--tokens", type=float, default=100e9)
    st.add_argument("--sample-fraction", type=float, default=0.2, help="SE-KD3X sample budget l")
    st.add_argument("--vocab-size", type=int, default=None, help="|V| of the Full KD row (default: the cache's)")
    st.set_defaults(fn=cmd_stats)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "token_budget", None) is not None:
        args.token_budget = int(args.token_budget)
    try:
        return args.fn(args)
    except CacheError as e:
        print(f"sekd-cache {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
