"""sekd/stores/teacher_cache/build.py: resumable (a killed build ends byte-identical), shareable between workers, refuses mixing."""

import json
import signal

import pytest
import torch

from sekd.stores.teacher_cache.build import build_cache, worker_shards
from sekd.selection.draws import rs_kd_draws, sample_generator, to_sparse
from sekd.stores.teacher_cache.store import MANIFEST, CacheError, TeacherCache, shard_name
from tests.stores.teacher_cache.helpers import BUILD, edit_manifest, folder_bytes, run_py

# A builder in a subprocess: argv = teacher folder, data file, out, vocab, build options (json), shards (json).
BUILDER = """
import json, sys, time, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
import sekd.stores.teacher_cache.build as B
from sekd.data.packing import PackedData
teacher_dir, data_file, out, vocab, opts, shards, pause = sys.argv[1:8]
merge = B._merge_manifest
def announce(out_, sig, n, entry):
    man = merge(out_, sig, n, entry)
    if entry is not None:
        print("SHARD", entry["index"], flush=True)
        time.sleep(float(pause))  # a window in which the parent kills us
    return man
B._merge_manifest = announce
model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
B.build_cache(model, PackedData.load(data_file), out, vocab_size=int(vocab), shards=json.loads(shards), **json.loads(opts))
print("DONE", flush=True)
"""


def builder(teacher_dir, data_file, out, vocab, shards=None, pause=0.0, wait=False):
    args = [str(teacher_dir), str(data_file), str(out), str(vocab), json.dumps(BUILD), json.dumps(shards), str(pause)]
    return run_py(BUILDER, *args, wait=wait)


def test_worker_shards_partition():
    parts = [worker_shards(10, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and parts[0] == [0, 3, 6, 9]
    with pytest.raises(ValueError):
        worker_shards(10, 3, 3)


def test_partial_build_resumes_byte_identical(built, teacher, data, vocab, tmp_path):
    out = tmp_path / "c"
    man = build_cache(teacher, data, out, vocab_size=vocab, shards=[0, 2], **BUILD)
    assert [e["index"] for e in man["shards"]] == [0, 2] and not man["complete"]
    with pytest.raises(CacheError, match="missing shard"):
        TeacherCache.open(out)
    before = (out / shard_name(0, 4)).stat().st_mtime_ns
    man = build_cache(teacher, data, out, vocab_size=vocab, **BUILD)
    assert man["complete"]
    assert (out / shard_name(0, 4)).stat().st_mtime_ns == before  # finished shards are skipped, not rebuilt
    assert folder_bytes(out) == folder_bytes(built)


def test_stale_or_corrupt_shards_are_rebuilt(built, teacher, data, vocab, cache_copy):
    """A shard written but never entered (killed between the two), and one that fails its checksum."""
    edit_manifest(cache_copy, lambda man: man.update(shards=[e for e in man["shards"] if e["index"] != 1]), reseal=True)
    (cache_copy / shard_name(1, 4)).write_bytes(b"half a shard")
    raw = bytearray((cache_copy / shard_name(3, 4)).read_bytes())
    raw[-1] ^= 1
    (cache_copy / shard_name(3, 4)).write_bytes(bytes(raw))
    build_cache(teacher, data, cache_copy, vocab_size=vocab, **BUILD)
    assert folder_bytes(cache_copy) == folder_bytes(built)


def test_killed_build_resumes_byte_identical(built, teacher, teacher_dir, data, data_file, vocab, tmp_path):
    out = tmp_path / "c"
    proc = builder(teacher_dir, data_file, out, vocab, pause=60)
    line = proc.stdout.readline()
    assert line.startswith("SHARD"), line + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close(), proc.stderr.close()
    man = json.loads((out / MANIFEST).read_text())
    assert len(man["shards"]) == 1 and not man["complete"]
    build_cache(teacher, data, out, vocab_size=vocab, **BUILD)
    assert folder_bytes(out) == folder_bytes(built)


def test_concurrent_workers_complete_one_cache(built, teacher_dir, data_file, vocab, tmp_path):
    out = tmp_path / "c"
    procs = [builder(teacher_dir, data_file, out, vocab, shards=worker_shards(4, i, 2), pause=0.3) for i in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0 and "DONE" in stdout, stderr
    man = json.loads((out / MANIFEST).read_text())
    assert man["complete"] and [e["index"] for e in man["shards"]] == [0, 1, 2, 3]
    TeacherCache.open(out, verify=True)
    assert folder_bytes(out) == folder_bytes(built)


def test_refuses_a_folder_of_another_signature(teacher, data, vocab, cache_copy):
    before = folder_bytes(cache_copy)
    with pytest.raises(CacheError) as e:
        build_cache(teacher, data, cache_copy, vocab_size=vocab, **{**BUILD, "n_draws": 12})
    msg = str(e.value)
    assert "\n" not in msg and "n_draws" in msg and str(cache_copy / MANIFEST) in msg
    with pytest.raises(CacheError, match="data"):
        build_cache(teacher, data.subset(range(3)), cache_copy, vocab_size=vocab, **BUILD)
    assert folder_bytes(cache_copy) == before


def test_wide_records_lossless(teacher, data, vocab, tmp_path):
    """N = 100 > 64 draws: 6-byte records, still exactly the fresh draws."""
    opts = {**BUILD, "n_draws": 100, "num_shards": 2}
    build_cache(teacher, data, tmp_path / "c", vocab_size=vocab, **opts)
    cache = TeacherCache.open(tmp_path / "c", verify=True)
    assert cache.stats()["bytes_per_record"] == 6
    sid, labels = data.sample_ids[1], data.labels[1:2]
    with torch.no_grad():
        z = teacher(input_ids=data.input_ids[1:2]).logits[0, :, :vocab]
    want = to_sparse(*rs_kd_draws(z[labels[0] != -100], 100, 1.0, sample_generator(sid, 0)), 100)
    got = cache.targets([sid], labels)
    assert all(torch.equal(a, b) for a, b in zip((got.ids, got.probs, got.mask), want))


def test_vocab_cut_and_batch_size_independence(built, teacher, data, vocab, tmp_path):
    """Another build batch size gives the same targets (content-keyed generators); ids stay below vocab_size."""
    build_cache(teacher, data, tmp_path / "c", vocab_size=vocab, **{**BUILD, "batch_size": 7})
    a, b = TeacherCache.open(built), TeacherCache.open(tmp_path / "c")
    for r, sid in enumerate(data.sample_ids):
        ta, tb = a.targets([sid], data.labels[r : r + 1]), b.targets([sid], data.labels[r : r + 1])
        assert all(torch.equal(x, y) for x, y in zip((ta.ids, ta.probs, ta.mask), (tb.ids, tb.probs, tb.mask)))
        assert int(ta.ids.max()) < vocab
    with pytest.raises(ValueError, match="vocab_size"):
        build_cache(teacher, data, tmp_path / "d", vocab_size=10**6, **BUILD)


def test_a_shard_held_by_another_builder_is_deferred_then_awaited(built, teacher, data, vocab, tmp_path):
    """A builder skips a shard whose lock another builder holds, builds the rest, then waits for it
    (and builds it itself when the holder left it unfinished)."""
    import threading
    import time

    from filelock import FileLock

    out = tmp_path / "c"
    out.mkdir()
    held = FileLock(str(out / ".shard-00001.lock"))
    held.acquire()
    worker = threading.Thread(target=build_cache, args=(teacher, data, out), kwargs={"vocab_size": vocab, **BUILD})
    worker.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if (out / MANIFEST).exists() and len(json.loads((out / MANIFEST).read_text())["shards"]) == 3:
                break
            time.sleep(0.05)
        assert [e["index"] for e in json.loads((out / MANIFEST).read_text())["shards"]] == [0, 2, 3]
        assert worker.is_alive()  # waiting for shard 1
    finally:
        held.release()
    worker.join(timeout=60)
    assert folder_bytes(out) == folder_bytes(built)


# ---------------------------------------------------------------- several kinds in one teacher pass

ONE_PASS = {**{k: v for k, v in BUILD.items() if k != "n_draws"}, "num_shards": 2}


def test_one_pass_of_every_kind_is_each_kind_built_alone(every_kind, teacher, data, vocab, tmp_path):
    """Byte for byte: each folder of the one-pass build is its kind's own build (its own manifest)."""
    for out, kind in every_kind.items():
        build_cache(teacher, data, tmp_path / out.name, kind=kind, vocab_size=vocab, **ONE_PASS)
        assert folder_bytes(tmp_path / out.name) == folder_bytes(out), kind


def test_a_one_pass_build_resumes_each_folder_where_it_stopped(every_kind, teacher, data, vocab, tmp_path):
    """One folder finished alone, another half built: the pass builds only what each lacks."""
    from sekd.stores.teacher_cache.build import build_caches

    outs = {tmp_path / out.name: kind for out, kind in list(every_kind.items())[:3]}
    first, second, third = outs
    build_cache(teacher, data, first, kind=outs[first], vocab_size=vocab, **ONE_PASS)
    build_cache(teacher, data, second, kind=outs[second], vocab_size=vocab, shards=[1], **ONE_PASS)
    before = (first / shard_name(0, 2)).stat().st_mtime_ns
    mans = build_caches(teacher, data, outs, vocab_size=vocab, **ONE_PASS)
    assert all(m["complete"] for m in mans.values()) and (first / shard_name(0, 2)).stat().st_mtime_ns == before
    for out in outs:
        assert folder_bytes(out) == folder_bytes(next(o for o in every_kind if o.name == out.name))


def test_refuses_a_folder_of_another_kind(every_kind, teacher, data, vocab, tmp_path):
    import shutil

    (tail,) = [out for out, kind in every_kind.items() if kind.form == "tail"]
    top_p = next(kind for kind in every_kind.values() if kind.name == "top_p")
    shutil.copytree(tail, tmp_path / "c")
    with pytest.raises(CacheError) as e:
        build_cache(teacher, data, tmp_path / "c", kind=top_p, vocab_size=vocab, **ONE_PASS)
    assert "\n" not in str(e.value) and "kind expected 'top_p', found 'top_k_tail'" in str(e.value)
    assert folder_bytes(tmp_path / "c") == folder_bytes(tail)
