import json
import math

import numpy as np
import pytest

from sekd.data.corpus import load_split
from sekd.evaluation.suites import get_suite
from sekd.evaluation.score import flatten, score_checkpoint, write_raw


@pytest.fixture(scope="module")
def scored(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    return out, score_checkpoint(tiny_checkpoint, out, artifacts_dir=cache, limit=20, batch_size=8)


def test_end_to_end_metrics(scored):
    _, m = scored
    expected = {
        "acc", "ppl", "ece",
        "sekd_choice_test/acc", "sekd_choice_test/acc_norm",
        "sekd_lastword_test/perplexity", "sekd_lastword_test/acc",
    }  # fmt: skip
    assert expected <= set(m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert 0 <= m["acc"] <= 100 and 0 <= m["ece"] <= 100
    assert m["ppl"] > 1
    assert m["acc"] == pytest.approx(50 * (m["sekd_choice_test/acc"] + m["sekd_lastword_test/acc"]))
    assert "ifeval" not in m and "gsm8k" not in m


def test_raw_output_kept(scored):
    out, m = scored
    raw = out / "lm_eval"
    res = json.loads((raw / "results.json").read_text())
    assert res["results"]["sekd_choice_test"]["acc,none"] == m["sekd_choice_test/acc"]
    for task in ("sekd_choice_test", "sekd_lastword_test"):
        rows = [json.loads(line) for line in (raw / f"samples_{task}.jsonl").read_text().splitlines()]
        assert len(rows) == 20
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]  # no temp files left


def test_explicit_docs_and_split(tiny_checkpoint, tmp_path):
    m = score_checkpoint(
        tiny_checkpoint, tmp_path / "run", split="validation", docs=load_split("validation")[:8],
        artifacts_dir=tmp_path / "cache", limit=5, bootstrap_iters=0,
    )  # fmt: skip
    assert "sekd_choice_validation/acc" in m and math.isfinite(m["ppl"])
    assert "sekd_choice_validation/acc_stderr" not in m  # 'N/A' without bootstrap, dropped


def test_docs_only_for_embedded(tmp_path):
    with pytest.raises(ValueError, match="embedded"):
        score_checkpoint(tmp_path, tmp_path, suite="paper", docs=["x"], artifacts_dir=tmp_path)


def _mc_samples(n, rng):
    return [
        {"filtered_resps": [(float(x), False) for x in rng.normal(size=4)], "target": int(rng.integers(4))}
        for _ in range(n)
    ]


def test_flatten_paper_suite():
    rng = np.random.default_rng(0)
    acc = {"arc_easy": 0.7, "hellaswag": 0.5, "piqa": 0.75, "lambada_openai": 0.6}
    results = {t: {"alias": t, "acc,none": np.float64(a), "acc_stderr,none": "N/A"} for t, a in acc.items()}
    results["lambada_openai"]["perplexity,none"] = np.float32(7.5)
    results["gsm8k"] = {"exact_match,strict-match": np.float64(0.4), "exact_match,flexible-extract": 0.45}
    results["ifeval"] = {"prompt_level_strict_acc,none": 0.2, "prompt_level_strict_acc_stderr,none": np.float64(0.01)}
    samples = {t: _mc_samples(30, rng) for t in ("arc_easy", "hellaswag", "piqa")}
    m = flatten({"results": results, "samples": samples}, get_suite("paper"))
    assert m["acc"] == pytest.approx(100 * (0.7 + 0.5 + 0.75 + 0.6 + 0.4) / 5)
    assert m["ppl"] == pytest.approx(7.5)
    assert m["ifeval"] == pytest.approx(20.0) and m["gsm8k"] == pytest.approx(40.0)
    assert m["gsm8k/exact_match,flexible-extract"] == 0.45 and m["arc_easy/acc"] == 0.7
    assert m["ifeval/prompt_level_strict_acc_stderr"] == 0.01
    assert "arc_easy/acc_stderr" not in m
    assert 0 <= m["ece"] <= 100
    assert all(type(v) is float for v in m.values())


def test_flatten_missing_metric_names_it():
    with pytest.raises(KeyError, match="hellaswag"):
        flatten({"results": {"arc_easy": {"acc,none": 0.5}}, "samples": {}}, get_suite("paper"))


def test_write_raw_converts_numpy(tmp_path):
    res = {
        "results": {"t": {"acc,none": np.float32(0.5), "n": np.int64(3), "acc_stderr,none": "N/A"}},
        "configs": {"t": {"process_docs": len, "arr": np.arange(2)}},
        "samples": {"t": [{"doc_id": np.int64(0), "filtered_resps": [(np.float32(-1.5), np.bool_(True))]}]},
    }
    write_raw(res, tmp_path)
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["results"]["t"] == {"acc,none": 0.5, "n": 3, "acc_stderr,none": "N/A"}
    assert back["configs"]["t"]["arr"] == [0, 1] and "samples" not in back
    assert json.loads((tmp_path / "samples_t.jsonl").read_text()) == {"doc_id": 0, "filtered_resps": [[-1.5, True]]}
