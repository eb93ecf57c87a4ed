"""The sample-selection pre-pass across ranks (sekd/stores/sample_importance.py; issue 13): two real gloo processes share the
pre-pass (rank r scores the single process's batches r::world), gather every score, pick the same samples,
and rank 0 alone writes a store file identical, byte for byte, to the one a single process writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sekd.stores.sample_importance import select_samples, shard_batches
from tests.selection.test_samples import SIGS, V, model

NAME, BATCH = "ce_ratio", 5


def pair_and_data():
    from sekd.data.packing import IGNORE, PackedData, sample_id

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (12, 10), generator=g)
    y = torch.randint(0, V, (12, 10), generator=g)
    y[torch.rand(12, 10, generator=g) < 0.3] = IGNORE
    y[4] = IGNORE
    return model(0), model(1), PackedData(x, y, [sample_id(x[i], y[i]) for i in range(12)])


def pick(store: Path, dist=None):
    student, teacher, data = pair_and_data()
    calls = []
    student.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    sel = select_samples(
        NAME,
        data,
        l=0.5,
        seed=0,
        student=student,
        teacher=teacher,
        vocab=V,
        batch_size=BATCH,
        store_dir=store,
        dist=dist,
        **SIGS,
    )
    return sel, calls


def rank_main(rank: int, root: str) -> None:
    from sekd.distributed.process_group import Dist

    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
    try:
        sel, calls = pick(Path(root) / "shared", Dist(rank=rank, world_size=2))
        (Path(root) / f"rank{rank}.json").write_text(
            json.dumps(
                {"indices": sel.indices, "scores": sel.importance.tolist(), "calls": calls, "n_scored": sel.n_scored}
            )
        )
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_share_the_prepass_and_store_what_one_process_stores(tmp_path):
    one, one_calls = pick(tmp_path / "single")
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(rank_main, args=(str(tmp_path),), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert one_calls == [5, 5, 2]
    assert ranks[0]["calls"] == [5, 2] and ranks[1]["calls"] == [5]  # batches 0, 2 and batch 1
    for r in ranks:
        assert r["indices"] == one.indices and r["scores"] == one.importance.tolist() and r["n_scored"] == 12
    single, shared = sorted((tmp_path / "single").glob("*.json")), sorted((tmp_path / "shared").glob("*.json"))
    assert [p.name for p in single] == [p.name for p in shared] and len(single) == 1
    assert single[0].read_bytes() == shared[0].read_bytes()


def test_shards_are_the_single_process_batches_dealt_round_robin():
    missing = [3, 1, 4, 15, 9, 2, 6, 5, 35, 8, 97]  # batches of 3: [3 1 4] [15 9 2] [6 5 35] [8 97]
    assert shard_batches(missing, 3, 0, 2) == [3, 1, 4, 6, 5, 35]
    assert shard_batches(missing, 3, 1, 2) == [15, 9, 2, 8, 97]
    got = [shard_batches(missing, 3, r, 3) for r in range(3)]
    assert sorted(i for g in got for i in g) == sorted(missing)
    assert shard_batches(missing, 3, 0, 1) == missing and shard_batches([], 3, 1, 2) == []
