"""The cache as training sees it, in real sekd-train subprocesses: a cache built by `sekd-cache build` serves the
run it was built for (any data options); every tampering is refused in one line, before any model is built or
loaded; the draws follow the run's seed (classes.cache=auto keys one cache per seed)."""

import json
import shutil

import pytest
import torch

from sekd.stores.teacher_cache.store import MANIFEST, TeacherCache, shard_name
from tests.stores.teacher_cache.helpers import edit_manifest
from tests.stores.teacher_cache.test_cli import sekd_cache
from tests.helpers import TINY, sekd_train, tiny_cache

DATA = ["data.token_budget=3200"]  # 50 sequences of 64 tokens
QUIET = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(root, name, *extra):
    return sekd_train([*TINY, *DATA, "train.steps=2", "eval=none", f"paths.root={root}/{name}", *extra], env=QUIET)


def record(root, name):
    (path,) = list((root / name).glob("runs/*/eval-*/record.json"))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_cache")
    tiny_cache(tmp_path_factory, folder / "cache")  # the pair prebuilt (root/fresh, the refusals' cache, starts empty)
    return folder


@pytest.fixture(scope="module")
def cli_cache(root):
    """Built by the CLI with the run's own overrides (the tiny pair is built under root/cache)."""
    out = root / "cli"
    res = sekd_cache(
        "build", "--out", str(out), "--num-shards", "2", "--quiet", *TINY, *DATA, f"paths.cache={root}/cache"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_a_cli_cache_serves_its_run(root, cli_cache):
    res = train(root, "ok", "experiment=rs_kd", f"classes.cache={cli_cache}", f"paths.cache={root}/cache")
    assert res.returncode == 0, res.stderr[-3000:]
    c = record(root, "ok")["costs"]
    assert not c["teacher_loaded"] and c["cache_bytes_read"] > 0


def flip_shard(folder):
    path = folder / shard_name(0, 2)
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x10
    path.write_bytes(bytes(raw))


def flip_manifest_digit(folder):
    raw = bytearray((folder / MANIFEST).read_bytes())
    raw[raw.index(b'"records": ') + len(b'"records": ')] ^= 0x01
    (folder / MANIFEST).write_bytes(bytes(raw))


def resealed(key, value):
    return lambda folder: edit_manifest(folder, lambda man: man["signature"].update({key: value}), reseal=True)


# case -> (tampering, what the one line must name besides the folder). Field edits are resealed (checksum
# recomputed), so each is refused by the run's comparison of that field; an edit left unsealed fails the checksum.
CASES = {
    "temperature": (resealed("temperature", 2.0), ["temperature expected 1.0, found 2.0"]),
    "seed": (resealed("seed", 7), ["seed expected 1337, found 7"]),
    "data": (resealed("data", "0123456789abcdef"), ["data expected", "found '0123456789abcdef'"]),
    "n_draws": (resealed("n_draws", 12), ["n_draws expected 64, found 12"]),
    "vocab_size": (resealed("vocab_size", 513), ["vocab_size expected 512, found 513"]),
    "manifest_byte": (flip_manifest_digit, [MANIFEST, "checksum mismatch"]),
    "shard_byte": (flip_shard, [shard_name(0, 2), "checksum mismatch"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_refuses_a_tampered_cache_before_any_model(root, cli_cache, tmp_path, case):
    """Under a fresh paths.cache the embedded pair is never built: the refusal comes first."""
    tamper, names = CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(cli_cache, bad)
    tamper(bad)
    fresh = root / "fresh"  # shared by the cases: tokenizer and packed data only, never a model
    res = train(tmp_path, "run", "experiment=rs_kd", f"classes.cache={bad}", f"paths.cache={fresh}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("sekd: config error: classes.cache:"), res.stderr
    assert str(bad) in lines[0] and all(n in lines[0] for n in names), lines[0]
    assert not list((fresh / "embedded").glob("model-*")), "a model was built before the refusal"
    assert not (tmp_path / "run" / "runs").exists()


def test_training_refuses_another_teacher(root, cli_cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(cli_cache, bad)
    resealed("teacher", "another-teacher")(bad)
    res = train(tmp_path, "run", "experiment=rs_kd", f"classes.cache={bad}", f"paths.cache={root}/cache")
    line = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and str(bad) in line and "teacher expected" in line and "found 'another-teacher'" in line


def test_a_cache_of_another_seed_is_refused(root, cli_cache, tmp_path):
    res = train(
        tmp_path, "run", "experiment=rs_kd", "seed=1338", f"classes.cache={cli_cache}", f"paths.cache={root}/cache"
    )
    line = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "seed expected 1338, found 1337" in line and "one cache per seed" in line


def test_each_seed_draws_its_own_auto_cache(root):
    caches = {}
    for seed in (1337, 1338):
        res = train(root, f"auto{seed}", "experiment=se_kd3x", f"seed={seed}", f"paths.cache={root}/cache")
        assert res.returncode == 0, res.stderr[-3000:]
        caches[seed] = TeacherCache.open(record(root, f"auto{seed}")["costs"]["cache"], verify=True)
    a, b = caches[1337], caches[1338]
    assert a.root != b.root and (a.signature["seed"], b.signature["seed"]) == (1337, 1338)
    common = sorted(
        set(a.shard(0).sample_ids() + a.shard(1).sample_ids()) & set(b.shard(0).sample_ids() + b.shard(1).sample_ids())
    )
    assert common
    differ = 0
    for sid in common:
        da, db = a.read(sid), b.read(sid)
        assert torch.equal(torch.from_numpy(da.valid), torch.from_numpy(db.valid))
        differ += not (len(da.ids) == len(db.ids) and (da.ids == db.ids).all() and (da.counts == db.counts).all())
    assert differ == len(common)  # other draws for every sample


def test_a_cli_cache_serves_jsonl_data_with_its_separator_and_options(root, tmp_path):
    """Source options (train_file, text_field) and a non-default separator: the CLI packs as training does."""
    from sekd.data import corpus

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus.load_split("train")[:200]))
    data = ["data=jsonl", f"data.train_file={path}", "data.text_field=body", "data.separator=.", *DATA]
    out = tmp_path / "cache"
    res = sekd_cache(
        "build", "--out", str(out), "--num-shards", "2", "--quiet", *TINY, *data, f"paths.cache={root}/cache"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = sekd_train(
        [
            *TINY,
            *data,
            "experiment=rs_kd",
            "train.steps=2",
            "eval=none",
            f"classes.cache={out}",
            f"paths.root={tmp_path}/run",
            f"paths.cache={root}/cache",
        ],
        env=QUIET,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    c = record(tmp_path, "run")["costs"]
    assert not c["teacher_loaded"] and c["cache_bytes_read"] > 0


# ---------------------------------------------------------------- kinds other than rs_kd

KINDS = ["--kind", "top_k_tail:top=8", "--kind", "top_p:p=0.9,max_k=8"]


def test_one_cli_pass_of_two_kinds_serves_a_run_of_each_kind(root, tmp_path):
    """`sekd-cache build` with two --kind: one folder each, `stats` reports both; a top_k_tail run trains from
    its folder with no teacher (a run pointed at a cache of another kind: tests/app/test_training.py)."""
    out = tmp_path / "kinds"
    res = sekd_cache(
        "build", "--out", str(out), "--num-shards", "2", "--quiet", *KINDS, *TINY, *DATA, f"paths.cache={root}/cache"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tail, top_p = out / "top_k_tail.top-8", out / "top_p.max_k-8.p-0.9"
    assert TeacherCache.open(top_p, verify=True).signature["kind"] == "top_p"
    assert f"train with classes=top_k_tail classes.options.top=8 classes.cache={tail}" in res.stdout
    stats = sekd_cache("stats", str(out))
    assert stats.returncode == 0 and "| top_k_tail(top=8) | tail | 4 |" in stats.stdout, stats.stdout + stats.stderr
    assert "top_p(max_k=8, p=0.9) | renormalized | 4 |" in stats.stdout
    run = ["classes=top_k_tail", "classes.options.top=8", f"paths.cache={root}/cache"]
    res = train(tmp_path, "tail", *run, f"classes.cache={tail}")
    assert res.returncode == 0, res.stderr[-3000:]
    c = record(tmp_path, "tail")["costs"]
    assert not c["teacher_loaded"] and c["cache_bytes_read"] > 0 and c["cache"] == str(tail)


def test_an_auto_cache_of_another_kind_trains(root, tmp_path):
    res = train(
        tmp_path, "auto", "classes=top_p", "classes.options.max_k=8", "classes.cache=auto", f"paths.cache={root}/cache"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    c = record(tmp_path, "auto")["costs"]
    cache = TeacherCache.open(c["cache"], verify=True)
    assert (cache.signature["kind"], cache.signature["max_k"], cache.form) == ("top_p", 8, "renormalized")
    assert c["cache_bytes_read"] > 0 and c["cache_build_seconds"] > 0
