"""Build the embedded default: a BPE tokenizer on the train split, and a teacher and a student
pretrained on it (the teacher bigger and longer, so KD has something real to transfer).

Every artifact is built once under a key of its inputs (sekd.core.artifacts); only the first run pays for it. For the
task-specific regime, `build_task_pair` fine-tunes the teacher on the embedded arithmetic task.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from sekd.core.artifacts import build_once, content_key
from sekd.data import corpus

if TYPE_CHECKING:
    from transformers import Qwen3Config

    from sekd.data.packing import PackedData

EOS = "<|endoftext|>"
FORMAT = 1  # in every artifact's key: bump to rebuild them all


def cached(artifacts_dir: Path, kind: str, inputs: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """`<artifacts_dir>/<kind>-<hash of inputs>/`, built by `build(folder)` once; its inputs.json marks it complete."""
    final = artifact_path(artifacts_dir, kind, inputs)

    def fill(tmp: Path) -> None:
        build(tmp)
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))

    return build_once(final, fill, folder=True, ready=lambda p: (p / "inputs.json").exists())


def artifact_path(artifacts_dir: Path, kind: str, inputs: dict[str, Any]) -> Path:
    """Where `cached` keeps the artifact of these inputs (built or not)."""
    return Path(artifacts_dir) / f"{kind}-{content_key({'format': FORMAT, **inputs})}"


def tokenizer(artifacts_dir: Path, vocab_size: int) -> Path:
    """Byte-level BPE trained on the train split, saved as a fast HF tokenizer."""

    def build(out: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus.load_split("train"), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
        fast.save_pretrained(out)

    inputs = {"corpus": corpus.signature(), "vocab_size": vocab_size, "model": "bpe-bytelevel"}
    return cached(artifacts_dir, "tokenizer", inputs, build)


def qwen3_config(spec: dict[str, Any], vocab_size: int, eos_id: int) -> Qwen3Config:
    from transformers import Qwen3Config

    return Qwen3Config(**qwen3_fields(spec, vocab_size, eos_id))


def qwen3_fields(spec: dict[str, Any], vocab_size: int, eos_id: int) -> dict[str, Any]:
    """The Qwen3Config of an embedded model as its fields: the memory plan reads the shape from these
    without importing transformers' modeling (sekd/app/plan.py)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=spec["hidden_size"] // spec["heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_dropout=0.0,
        torch_dtype="float32",  # 4.x's name (pyproject allows >= 4.51): 5's stub omits it
    )


def fit_lm(
    model: torch.nn.Module,
    data: PackedData,
    spec: dict[str, Any],
    seed: int,
    *,
    desc: str,
    trim_padding: bool = False,
    val: PackedData | None = None,
) -> tuple[float, int, float, list[dict[str, float]]]:
    """Next-token CE on `data` (labels -100 ignored) for spec["steps"] batches of spec["batch_size"]:
    AdamW, 5% warm-up then cosine at spec["lr"], clipped gradients. Returns (final loss, epochs, seconds, curve).
    trim_padding drops each batch's columns after its last label (right padding only: same loss).

    With `val` data and spec["keep"] == "best_validation", the validation CE is measured every
    spec["eval_every"] steps (and at the end) and the model ends at its best step, not its last: on a corpus
    this small a longer-trained model memorizes its train split, and the best held-out loss is the one that
    generalizes. `curve` holds one {step, train_loss, val_loss} per measurement ([] without them)."""
    from sekd.data.dataset import batches

    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    steps, warm = spec["steps"], max(1, spec["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    held = val if spec.get("keep", "last") == "best_validation" else None  # None: the model ends at its last step
    every = int(spec.get("eval_every", 50))
    best, curve = math.inf, []
    best_state: dict[str, torch.Tensor] | None = None
    model.train()
    it: Iterator[list[int]] = iter(())
    epoch, t0 = 0, time.time()
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False):
        idx = next(it, None)
        if idx is None:
            it = iter(batches(data, micro_batch_size=spec["batch_size"], seed=seed, epoch=epoch))
            epoch, idx = epoch + 1, next(it)
        x, y = data.input_ids[idx], data.labels[idx]
        if trim_padding:
            end = int((y != -100).nonzero()[:, 1].max()) + 1
            x, y = x[:, :end], y[:, :end]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if held is not None and (step % every == 0 or step == steps):
            held_out = mean_ce(model, held)
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(held_out, 4)})
            if held_out < best:
                best = held_out
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.train()
    if best_state is not None:
        model.load_state_dict(best_state)
    return loss.item(), epoch, time.time() - t0, curve


@torch.no_grad()
def mean_ce(model: torch.nn.Module, data: PackedData, batch_size: int = 32) -> float:
    """Mean next-token CE per labelled token of `data` (packed, labels -100 ignored), in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.input_ids), batch_size):
        x, y = data.input_ids[i : i + batch_size], data.labels[i : i + batch_size]
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((y != -100).sum())
    return total / max(1, count)


def pretrained_model(
    artifacts_dir: Path, role: str, tok_dir: Path, spec: dict[str, Any], seq_len: int, seed: int
) -> Path:
    """A tiny Qwen3 pretrained with next-token CE on the train split (cosine lr), saved with its tokenizer."""

    def build(out: Path) -> None:
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from sekd.data.dataset import build_packed

        tok = AutoTokenizer.from_pretrained(tok_dir)

        def pack(split: str):
            return build_packed(
                "embedded", split, tok, seq_len=seq_len, token_budget=None, artifacts_dir=artifacts_dir / "data"
            )

        val = pack("validation") if spec.get("keep", "last") == "best_validation" else None
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(qwen3_config(spec, len(tok), tok.eos_token_id))
        loss, epochs, seconds, curve = fit_lm(model, pack("train"), spec, seed, desc=f"pretrain {role}", val=val)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        summary = f"final_loss={loss:.4f} epochs={epochs} seconds={seconds:.1f}"
        if curve:
            kept = min(curve, key=lambda c: c["val_loss"])
            summary += f" kept_step={kept['step']} val_loss={kept['val_loss']:.4f}"
            (out / "pretrain_curve.json").write_text(json.dumps(curve))
        (out / "pretrain.txt").write_text(summary + "\n")

    return cached(artifacts_dir, f"model-{role}", model_inputs(role, tok_dir, spec, seq_len, seed), build)


def model_inputs(role: str, tok_dir: Path, spec: dict[str, Any], seq_len: int, seed: int) -> dict[str, Any]:
    """What a pretrained model's artifact is keyed by."""
    return {
        "role": role,
        "tokenizer": tok_dir.name,
        "spec": dict(spec),
        "seq_len": seq_len,
        "seed": seed,
        "corpus": corpus.signature(),
    }


def build_pair(artifacts_dir: Path, emb: dict[str, Any]) -> tuple[Path, Path]:
    """(teacher folder, student folder), each holding a model and the shared tokenizer."""
    artifacts_dir = Path(artifacts_dir)
    tok_dir = tokenizer(artifacts_dir, emb["vocab_size"])
    args = {
        "teacher": (emb["teacher"], emb["seq_len"], emb["seed"]),
        "student": (emb["student"], emb["seq_len"], emb["seed"] + 1),
    }
    # The cells of a sweep start together: while one pretrains the teacher, the next pretrains the student
    # instead of waiting (each model seeds its own pretraining, so the order changes nothing in either).
    teacher = artifact_path(artifacts_dir, "model-teacher", model_inputs("teacher", tok_dir, *args["teacher"]))
    order = ("student", "teacher") if Path(f"{teacher}.lock").exists() else ("teacher", "student")
    with torch.random.fork_rng():
        built = {role: pretrained_model(artifacts_dir, role, tok_dir, *args[role]) for role in order}
    return built["teacher"], built["student"]


# The embedded task teacher's fine-tune (docs/method.md §10 task-specific regime at CPU scale); ~1-2 min, 1 thread.
# 500 steps at lr 2e-3 give ~60% greedy exact match on arith test (the untuned pair: 0%).
TASK = {"steps": 500, "lr": 2.0e-3, "batch_size": 32, "seq_len": 64}


def task_model(artifacts_dir: Path, base: Path, role: str, task: dict[str, Any], seed: int) -> Path:
    """`base` (a model folder with its tokenizer) fine-tuned on the arith train split, CE on answer tokens."""
    from sekd.data import arith

    task = {**TASK, **task}

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sekd.data.qa import build_qa

        tok = AutoTokenizer.from_pretrained(base)
        data = build_qa("arith", "train", tok, seq_len=task["seq_len"], artifacts_dir=Path(artifacts_dir) / "data")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        # labels are -100 outside the answer: the prompt and the padding teach nothing
        loss, epochs, seconds, _ = fit_lm(model, data, task, seed, desc=f"fine-tune {role} on arith", trim_padding=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "finetune.txt").write_text(
            f"final_loss={loss:.4f} epochs={epochs} seconds={seconds:.1f} task={json.dumps(task)}\n"
        )

    inputs = {"role": role, "base": Path(base).name, "task": dict(task), "seed": seed, "arith": arith.signature()}
    return cached(artifacts_dir, f"task-{role}", inputs, build)


def build_task_pair(artifacts_dir: Path, emb: dict[str, Any], task: dict[str, Any]) -> tuple[Path, Path]:
    """(task-tuned teacher, untuned student): the distillation has to teach the student the task."""
    teacher, student = build_pair(artifacts_dir, emb)
    with torch.random.fork_rng():
        teacher = task_model(artifacts_dir, teacher, "teacher", task, emb["seed"])
    return teacher, student


def exact_match(
    folder: Path, split: str = "test", n: int | None = None, batch_size: int = 64, max_new_tokens: int = 24
) -> float:
    """Greedy-decoding exact match (qa_format.final_answer) of a model folder on the arith task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sekd.data import arith, qa_format

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"  # generation continues every prompt from its last real token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    problems = arith.problems(split, n)
    hits = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = tok(
            [qa_format.prompt_text(p["question"]) for p in chunk],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(qa_format.final_answer(t) == qa_format.final_answer(p["answer"]) for t, p in zip(texts, chunk))
    return hits / max(1, len(problems))
