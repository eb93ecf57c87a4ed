"""The precision a run computes in is part of its identity (run folder, record, sample-score store key).

train.precision=auto is bf16 on a GPU and fp32 on a CPU, and scoring is bf16 on a GPU: a CPU fp32 run and a
GPU bf16 run of one preset have different numbers, so they must not share a folder (the second would be
skipped as trained, or resume the other's checkpoint) nor a store of sample scores. CPU autocast computes
in bf16 too, so the real thing is tested here with train.precision=bf16 against fp32.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from sekd.stores.runs import config_hash, eval_hash, train_hash
from tests.helpers import TINY, compose_cfg, sekd_train, tiny_cache


def hashes(overrides: list[str], cuda: bool) -> tuple[str, str, str]:
    cfg = compose_cfg(["experiment=se_kd", *overrides])
    return train_hash(cfg, cuda=cuda), config_hash(cfg, cuda=cuda), eval_hash(cfg, cuda=cuda)


def test_precision_auto_resolves_where_the_run_computes():
    cpu_auto, gpu_auto = hashes([], cuda=False), hashes([], cuda=True)
    assert cpu_auto == hashes(["train.precision=fp32"], cuda=False)  # auto on a CPU is fp32
    assert gpu_auto[0] == hashes(["train.precision=bf16"], cuda=True)[0]  # auto on a GPU is bf16
    assert cpu_auto[0] != gpu_auto[0] and cpu_auto[1] != gpu_auto[1]
    assert hashes(["train.precision=bf16"], cuda=False)[0] == gpu_auto[0]  # bf16 is bf16, CPU or GPU
    assert hashes(["train.device=cpu"], cuda=True)[0] == cpu_auto[0]  # a CPU run on a GPU machine: fp32
    # scoring: bf16 on a GPU, so its records differ; no suite, nothing to differ
    assert cpu_auto[2] != gpu_auto[2]
    assert hashes(["eval.device=cpu"], cuda=True)[2] == cpu_auto[2]
    assert hashes(["eval=none"], cuda=False)[2] == hashes(["eval=none"], cuda=True)[2]


def test_a_bf16_run_does_not_share_the_folder_of_an_fp32_run(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    base = [
        *TINY,
        "experiment=se_kd",
        "train.steps=2",
        "eval=none",
        f"paths.root={tmp_path}",
        f"paths.cache={tmp_path}/cache",
    ]
    fp32 = sekd_train([*base, "train.precision=fp32"], env={"OMP_NUM_THREADS": "1"})
    assert fp32.returncode == 0, fp32.stderr[-2000:]
    bf16 = sekd_train([*base, "train.precision=bf16"], env={"OMP_NUM_THREADS": "1"})
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    assert "skipping" not in bf16.stdout + bf16.stderr and "resumed" not in bf16.stdout + bf16.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    w = [load_file(r / "model" / "model.safetensors") for r in runs]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])  # trained twice, differently
    # the default (auto) on this CPU is the fp32 run: found, not trained again
    auto = sekd_train(base, env={"OMP_NUM_THREADS": "1"})
    assert auto.returncode == 0 and len(list((tmp_path / "runs").iterdir())) == 2


def test_the_sample_prepass_runs_and_stores_at_the_runs_precision(tmp_path):
    from tests.selection.test_samples import SIGS, V, model

    from sekd.data.packing import IGNORE, PackedData, sample_id
    from sekd.stores.sample_importance import select_samples, store_fields, store_path
    from sekd.selection.samples import SAMPLE_SELECTORS

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (8, 10), generator=g)
    y = torch.randint(0, V, (8, 10), generator=g)
    y[torch.rand(8, 10, generator=g) < 0.3] = IGNORE
    data = PackedData(x, y, [sample_id(x[i], y[i]) for i in range(8)])
    student = model(0)
    seen: list[torch.dtype] = []
    student.register_forward_hook(lambda m, a, out: seen.append(out.logits.dtype))
    kw = dict(l=0.5, seed=0, student=student, vocab=V, batch_size=4, store_dir=tmp_path, **SIGS)
    fp32 = select_samples("top_student_entropy", data, **kw)
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = select_samples("top_student_entropy", data, dtype=torch.bfloat16, **kw)
    assert set(seen) == {torch.bfloat16} and not bf16.reused  # its own pre-pass, not fp32's stored scores
    assert torch.allclose(bf16.importance, fp32.importance, rtol=0.05, atol=0.05)  # bf16 logits: ~3 significant digits
    selector = SAMPLE_SELECTORS.get("top_student_entropy")
    keys = {
        store_path(tmp_path, store_fields(selector, vocab=V, temperature=1.0, dtype=d, **SIGS))
        for d in (torch.float32, torch.bfloat16)
    }
    assert len(keys) == 2 and all(k.exists() for k in keys)
    assert json.loads(sorted(keys)[0].read_text())["fields"]["dtype"] in ("fp32", "bf16")
