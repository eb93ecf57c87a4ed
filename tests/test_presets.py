"""Every paper row's preset runs on the embedded default, and its selection trace obeys its policy."""

import csv
import json
import math

import pytest
import yaml

from sekd.app import execute
from tests.helpers import CONF, PRESETS, ROOT, TINY, compose_cfg, shared_dir

# the presets that distil (the others set mode: score_*), read from their files: composing each at collection would
# cost every pytest process seconds; the test checks that each composes to mode=distill
DISTILL = [
    p
    for p in PRESETS
    if yaml.safe_load((CONF / "experiment" / f"{p}.yaml").read_text()).get("mode", "distill") == "distill"
]
PAPER = ROOT / "sekd" / "report" / "paper" / "paper_tables.csv"


TABLES = ("T2", "T3", "T4", "T5", "V1", "V2")


def test_paper_rows_map_every_row_of_the_tables_to_a_preset():
    mapping = list(csv.DictReader((ROOT / "sekd" / "report" / "paper" / "paper_rows.csv").open()))
    assert all(r["preset"] in PRESETS for r in mapping)
    mapped = {(r["table"], r["section"], r["method"]) for r in mapping}
    paper = {(r["table"], r["section"], r["method"]) for r in csv.DictReader(PAPER.open()) if r["table"] in TABLES}
    assert paper == mapped
    assert len(mapped) == len(mapping) == 48 + 17  # T2-T4, V1, V2; T5's 10 off-policy and 7 on-policy rows
    on_policy = [r["preset"] for r in mapping if r["section"] == "on-policy"]
    assert len(on_policy) == 7 and all(compose_cfg([f"experiment={p}"]).regime.name == "on_policy" for p in on_policy)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One paths.cache for every preset, whichever pytest-xdist worker runs it (its builds take locks)."""
    folder = shared_dir(tmp_path_factory) / "presets-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prompt_lengths_by_sample(tree) -> dict[str, int]:
    from sekd.app.checks import typed
    from sekd.data.qa import prompt_lengths
    from sekd.models.loading import load_tokenizer, resolve_pair
    from sekd.app.training import training_data

    cfg = typed(tree)
    data = training_data(cfg, load_tokenizer(resolve_pair(cfg)[2]))
    return dict(zip(data.sample_ids, prompt_lengths(data).tolist()))


def n_select(n_valid, k):
    return min(max(1, math.ceil(n_valid * k - 1e-9)), n_valid)


def check_trace_row(row, policy, k, S):
    valid, scores, sel, w = row["valid"], row["scores"], row["selected"], row["weights"]
    assert len(scores) == len(valid) and len(w) == len(sel)
    assert set(sel) <= set(valid)
    u = dict(zip(valid, scores))
    n = n_select(len(valid), k) if valid else 0
    if policy == "all":
        assert sorted(sel) == valid and w == [1.0] * len(valid)
    elif policy == "top_k":
        assert set(sel) == set(sorted(valid, key=lambda t: (-u[t], t))[:n]) and len(sel) == n
    elif policy == "random":
        assert len(set(sel)) == len(sel) == n
    elif policy == "gls":  # a threshold: every selected score is at least every unselected one
        rest = [u[t] for t in valid if t not in set(sel)]
        assert len(set(sel)) == len(sel)
        assert not sel or not rest or min(u[t] for t in sel) >= max(rest)
    elif policy == "curriculum":  # a window of n in ascending-u order, starting at floor((n_valid-n) pi)
        order = sorted(valid, key=lambda t: (u[t], -t))
        start = math.floor((len(valid) - n) * min(1.0, row["step"] / S))
        assert set(sel) == set(order[start : start + n])
    elif policy == "pos_rs":
        assert len(sel) == n and w == [1.0] * n
    elif policy == "pos_rs_star":
        total = sum(u.values())
        assert len(sel) == n
        for t, wt in zip(sel, w):
            assert wt * len(valid) * u[t] / total == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("preset", DISTILL)
def test_preset_runs_and_traces_its_policy(preset, cache, tmp_path):
    over = [
        *TINY,
        f"experiment={preset}",
        "train.steps=2",
        "train.trace_selection_steps=2",
        "eval=none",
        f"paths.root={tmp_path}",
        f"paths.cache={cache}",
    ]
    on_policy = compose_cfg([f"experiment={preset}"]).regime.name == "on_policy"
    if on_policy:  # Table 5's on-policy rows answer task prompts
        over += ["data.seq_len=128", "regime.max_new_tokens=12"]  # the preset brings data=arith
    cfg = compose_cfg(over)
    assert cfg.mode == "distill"
    if cfg.position.policy == "curriculum":
        cfg = compose_cfg([*over, "position.options.S=2"])  # reach the middle of the curriculum in 2 steps
    record = execute(cfg)
    assert record["steps"] == 2 and record["tokens_supervised"] > 0
    (trace,) = list(tmp_path.glob("runs/*/selection_trace.jsonl"))
    rows = [json.loads(ln) for ln in trace.read_text().splitlines()]
    assert len(rows) == 2 * cfg.train.grad_accum * cfg.train.micro_batch_size  # per sequence per micro-step
    assert {r["step"] for r in rows} == {0, 1}
    S = cfg.position.options.get("S", 1)
    for row in rows:
        check_trace_row(row, cfg.position.policy, cfg.position.k, S)
    if cfg.position.policy not in ("all",):
        frac = record["tokens_supervised"] / sum(len(r["valid"]) for r in rows)
        assert frac < 0.5  # 20% budgets supervise far fewer positions than Full KD
        assert all(len(set(r["selected"])) < len(r["valid"]) for r in rows if len(r["valid"]) > 1)  # strict subset
    if cfg.samples.name != "all":  # training iterates over the kept samples only
        assert record["train_samples"] == math.floor(cfg.samples.l * record["available_samples"])
        kept = json.loads(next(tmp_path.glob("runs/*/samples.json")).read_text())["kept"]
        assert len(kept) == record["train_samples"] and {r["sample"] for r in rows} <= set(kept)
    if on_policy:  # every batch was the student's own answers; only generated tokens are supervised
        assert record["on_policy_batches"] == 2 * cfg.train.grad_accum
        plen = prompt_lengths_by_sample(cfg)
        for row in rows:  # a contiguous run from the prompt's last token (which predicts the first answer token)
            assert row["valid"] and row["valid"] == list(range(plen[row["sample"]] - 1, row["valid"][-1] + 1))
            assert len(row["valid"]) <= cfg.regime.max_new_tokens
