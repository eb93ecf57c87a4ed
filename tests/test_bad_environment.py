"""Bad files and a machine that lacks what the run needs (docs/bad-inputs.md, "Files and environment").

Each row runs the real CLI in a subprocess and must end in one line on stderr naming the file or key,
exit status 2, before any model is built or loaded (the run's paths.cache stays empty: the embedded
pair, tokenizers and packed data all live there), and with nothing left under paths.root: no run
folder, no eval-*/config.yaml, no empty hydra/<time>/train.log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, sekd_train

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, even on a GPU machine
BASE = [a for a in TINY if not a.startswith("model=")]  # rows that name another model replace model=tiny

TEXT = (json.dumps({"text": "The cat sat on the mat."}) + "\n").encode()
QA = (json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n").encode()
NOT_UTF8 = b'{"text": "caf\xe9"}\n'  # Latin-1, not UTF-8


def bad_lines(good: bytes, field: str) -> dict[str, tuple[bytes, str]]:
    """The four kinds of malformed file, each (content, what the message must say after file:line)."""
    return {
        "bad JSON": (good + b"{not json\n", ":2: not valid JSON"),
        "missing field": (good + json.dumps({"other": "x"}).encode() + b"\n", f":2: record has no field '{field}'"),
        "non-string field": (
            good + json.dumps({"question": 7, "answer": 7, "text": 7}).encode() + b"\n",
            f":2: field '{field}' is int, not a string",
        ),
        "empty file": (b"", ": holds no records"),
        "non-UTF-8 bytes": (good + NOT_UTF8.replace(b'"text"', f'"{field}"'.encode()), ":2: not UTF-8"),
    }


# (id, files to write under tmp, overrides ({tmp} is the test's folder), extra env, expected substring)
ROWS = [
    *[
        (
            f"jsonl {kind}",
            {"f.jsonl": content},
            ["data=jsonl", "data.train_file={tmp}/f.jsonl"],
            {},
            "{tmp}/f.jsonl" + says,
        )
        for kind, (content, says) in bad_lines(TEXT, "text").items()
    ],
    *[
        (
            f"gsm8k {kind}",
            {"f.jsonl": content},
            ["data=gsm8k", "data.train_file={tmp}/f.jsonl"],
            {},
            "{tmp}/f.jsonl" + says,
        )
        for kind, (content, says) in bad_lines(QA, "question").items()
    ],
    (
        "gsm8k bad test_file",
        {"f.jsonl": QA, "t.jsonl": QA + b"[1, 2]\n"},
        ["data=gsm8k", "data.train_file={tmp}/f.jsonl", "data.test_file={tmp}/t.jsonl"],
        {},
        "{tmp}/t.jsonl:2: record is list, not an object",
    ),
    (
        "train.device=cuda without CUDA",
        {},
        ["train.device=cuda"],
        CPU_ONLY,
        "train.device=cuda but this machine has no CUDA device",
    ),
    (
        "eval.device=cuda without CUDA",
        {},
        ["eval.device=cuda"],
        CPU_ONLY,
        "eval.device=cuda but this machine has no CUDA device",
    ),
    (
        "model.teacher_device=cuda:3 without CUDA",
        {},
        ["model.teacher_device=cuda:3"],
        CPU_ONLY,
        "model.teacher_device=cuda:3 but this machine has no CUDA device",
    ),
    (
        "model.teacher_device=cuda without CUDA",
        {},
        ["model.teacher_device=cuda"],
        CPU_ONLY,
        "model.teacher_device=cuda but this machine has no CUDA device",
    ),
    (
        "train.distributed=fsdp on one rank",
        {},
        ["train.distributed=fsdp"],
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"},
        "train.distributed=fsdp shards the models over ranks, but this process is rank 0 of 1",
    ),
    (
        "paper pair offline, not cached",
        {},
        ["model=qwen3_8b_to_1.7b"],
        {},
        "model.teacher='Qwen/Qwen3-8B' is not on local disk and the hub is offline (HF_HUB_OFFLINE=1)",
    ),
    (
        "hub teacher offline, local student",
        {"student/config.json": b"{}"},
        ["model.source=pretrained", "model.teacher=some/hub-name", "model.student={tmp}/student"],
        {},
        "model.teacher='some/hub-name' is not on local disk and the hub is offline",
    ),
    (
        "model folder missing",
        {},
        ["model=qwen3_8b_to_1.7b", "model.teacher={tmp}/nowhere"],
        {},
        "model.teacher='{tmp}/nowhere': no such folder",
    ),
    (
        "model folder without config.json",
        {"m/README.md": b"x"},
        ["model=qwen3_8b_to_1.7b", "model.teacher={tmp}/m", "model.student={tmp}/m"],
        {},
        "model.teacher='{tmp}/m' is a folder without config.json",
    ),
    # passes the up-front checks and fails at the tokenizer: the run folder and config.yaml must not appear
    (
        "unreadable tokenizer",
        {"m/config.json": b"{}", "m/tokenizer_config.json": b"{not json"},
        ["model=qwen3_8b_to_1.7b", "model.teacher={tmp}/m", "model.student={tmp}/m"],
        {},
        "model.student='{tmp}/m': cannot load its tokenizer",
    ),
    ("stage=score before training", {}, ["stage=score"], {}, "stage=score: {tmp}/root/runs/"),
    (
        "hydra/launcher=slurm without sbatch",
        {},
        ["-m", "hydra/launcher=slurm"],
        "NO_SBATCH",
        "hydra/launcher=slurm submits with sbatch, which is not on this machine's PATH",
    ),
]


def path_without_sbatch() -> str:
    return os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "sbatch").exists()
    )


def everything_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize("files,overrides,env,expected", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_refused_in_one_line_before_any_model_and_leaves_nothing(tmp_path, files, overrides, env, expected):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    root, cache = tmp_path / "root", tmp_path / "cache"
    env = {"PATH": path_without_sbatch()} if env == "NO_SBATCH" else env
    # an empty Hugging Face cache: a hub name is never on local disk here
    env = {**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "hf"), **env}
    model = [] if any(o.startswith(("model=", "model.")) for o in overrides) else ["model=tiny"]
    args = [o.format(tmp=tmp_path) for o in overrides]
    flags = [a for a in args if a.startswith("-")]  # -m goes before the overrides
    args = [*flags, *BASE, *model, f"paths.root={root}", f"paths.cache={cache}", *(a for a in args if a not in flags)]
    res = sekd_train(args, env=env, timeout=300)

    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("sekd: config error: "), res.stderr[-3000:]
    assert expected.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in res.stdout
    assert everything_under(root) == []  # no run folder, no config.yaml, no hydra/<time>/train.log
    assert everything_under(cache) == []  # nothing built or loaded: no embedded pair, tokenizer, packed data
    assert not (tmp_path / "hf").exists()  # and nothing fetched


def test_benchmark_refuses_a_cuda_shape_without_cuda(tmp_path):
    out = tmp_path / "out.json"
    res = subprocess.run(
        [sys.executable, "benchmarks/kd_step.py", "--shape", "qwen3_8b_to_1.7b", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, **CPU_ONLY},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        "kd_step: --shape qwen3_8b_to_1.7b (a GPU shape) needs CUDA, but this machine has no CUDA device; run it "
        "on a GPU machine, or pass --device cpu (and a smaller --batch/--seq) to run it here"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    "version,refused",
    [("2.5.1+cu121", True), ("2.7.0", True), ("2.8.0", False), ("2.13.0+cpu", False), ("2.8.0a0+gitabc", False)],
)
def test_fsdp_on_a_torch_without_fsdp2s_switches_is_one_line_naming_the_version(version, refused, monkeypatch):
    """train.distributed=fsdp uses FSDP2's fully_shard, MixedPrecisionPolicy and its sum-reduction switches,
    which older torch lacks: refused from the config, before any launcher or model is asked."""
    import torch

    from sekd.app.compose import check_fsdp
    from sekd.core.errors import ConfigError
    from sekd.app.checks import typed
    from sekd.distributed.fsdp import FSDP_MIN_TORCH
    from tests.helpers import compose_cfg

    cfg = typed(compose_cfg(["train.distributed=fsdp"]))
    monkeypatch.setattr(torch, "__version__", version)
    if not refused:
        check_fsdp(cfg)
        return
    with pytest.raises(ConfigError) as e:
        check_fsdp(cfg)
    line = str(e.value)
    assert "\n" not in line and line.startswith("train.distributed=fsdp needs torch >= " + FSDP_MIN_TORCH)
    assert version in line
