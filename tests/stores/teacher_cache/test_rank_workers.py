"""classes.cache=auto on several ranks (sekd.app.training.auto_cache): the ranks are the cache's workers,
rank r building shards r, r+W, ..., and together they build the folder a single process builds, byte for
byte (the draws are keyed by sample and seed, not by who draws them)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from sekd.app.training import auto_cache
from sekd.stores.teacher_cache.build import NUM_SHARDS, build_cache
from sekd.stores.teacher_cache.kinds import cache_kind
from sekd.stores.teacher_cache.store import read_manifest
from sekd.distributed.process_group import Dist
from tests.stores.teacher_cache.helpers import BUILD, folder_bytes
from tests.helpers import sekd_train
from tests.test_distributed import args, torchrun

EXPECT = {
    "teacher": BUILD["teacher_name"],
    "tokenizer": BUILD["tokenizer_sig"],
    **cache_kind("rs_kd", {"n_draws": BUILD["n_draws"]}).signature(),
    "temperature": BUILD["temperature"],
    "seed": BUILD["seed"],
}


def built_shards(folder: Path) -> list[int]:
    return sorted(e["index"] for e in read_manifest(folder)["shards"])


def test_each_rank_builds_its_own_shards_and_together_they_build_the_one_process_cache(teacher, data, vocab, tmp_path):
    cfg = SimpleNamespace(paths=SimpleNamespace(cache=str(tmp_path)), samples=SimpleNamespace(batch_size=3))
    parts = SimpleNamespace(teacher=SimpleNamespace(raw=lambda: teacher), data=data, vocab=vocab, costs={})
    folder = auto_cache(cfg, EXPECT, parts, Dist(rank=1, world_size=2))
    assert built_shards(folder) == list(range(1, NUM_SHARDS, 2))  # rank 1 of 2: its shards only
    assert auto_cache(cfg, EXPECT, parts, Dist(rank=0, world_size=2)) == folder
    assert built_shards(folder) == list(range(NUM_SHARDS))

    alone = tmp_path / "alone"
    build_cache(teacher, data, alone, vocab_size=vocab, **{**BUILD, "num_shards": NUM_SHARDS, "batch_size": 3})
    assert folder_bytes(folder) == folder_bytes(alone)


def test_two_torchrun_ranks_build_the_one_process_cache(tmp_path):
    two = torchrun(args(tmp_path / "a" / "run", "se_kd3x", 2, steps=1))
    assert two.returncode == 0, two.stderr[-3000:]
    one = sekd_train(args(tmp_path / "b" / "run", "se_kd3x", 4, steps=1), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    (a,), (b,) = (
        list((tmp_path / "a" / "cache" / "teacher_cache").iterdir()),
        list((tmp_path / "b" / "cache" / "teacher_cache").iterdir()),
    )
    assert len(built_shards(b)) == NUM_SHARDS
    assert folder_bytes(a) == folder_bytes(b)
