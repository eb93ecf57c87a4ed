"""A teacher/student pair at a kd_step.py shape, random weights, saved as Hugging Face folders that
`sekd-train model=qwen3_8b_to_1.7b model.teacher=DIR/teacher model.student=DIR/student` trains as it would the
real pair: nothing is downloaded.

    python benchmarks/paper_pair.py --shape qwen3_8b_to_1.7b --out /tmp/pair     # on a GPU: ~20 GB written
    python benchmarks/paper_pair.py --shape tiny --out /tmp/pair --device cpu     # the same, in seconds

The tokenizer is a byte-level BPE trained on the embedded corpus, its vocabulary filled up to the shape's
(151,936 for Qwen3) with entries no text reaches: every LM head, softmax and class draw runs over the full
vocabulary, as with Qwen's own tokenizer, while the text tokenizes as the embedded corpus does. Weights are
saved in bf16 (the teacher's compute dtype; the student is loaded in fp32 master weights by sekd-train).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from kd_step import SHAPES, qwen3  # noqa: E402

EOS = "<|endoftext|>"
TRAINED_VOCAB = 8192  # BPE merges learned from the corpus (it holds ~465k characters); the rest is filler


def tokenizer(vocab: int):
    """A fast tokenizer with exactly `vocab` entries: BPE learned on the embedded corpus, then unreachable
    filler entries (no merge produces them) up to `vocab`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sekd.data import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, TRAINED_VOCAB),
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.load_split("train"), trainer=trainer)
    spec = json.loads(tok.to_str())
    table = spec["model"]["vocab"]
    for i in range(len(table), vocab):
        table[f"<|filler_{i}|>"] = i
    filled = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=filled, eos_token=EOS, pad_token=EOS)
    assert len(fast) == vocab, (len(fast), vocab)
    return fast


def build(shape_name: str, out: Path, device: str) -> dict:
    shape = SHAPES[shape_name]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = tokenizer(shape.vocab)
    eos = tok.convert_tokens_to_ids(EOS)
    sizes = {}
    for role, body in (("teacher", shape.teacher), ("student", shape.student)):
        torch.manual_seed({"teacher": 1, "student": 0}[role])
        model = qwen3(body, shape.vocab, torch.bfloat16, device)
        model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = eos
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        sizes[role] = sum(p.numel() for p in model.parameters())
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    info = {
        "shape": shape_name,
        "vocab": shape.vocab,
        "params": sizes,
        "seconds": round(time.perf_counter() - t0, 1),
        "teacher": str(out / "teacher"),
        "student": str(out / "student"),
    }
    (out / "pair.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3_8b_to_1.7b", choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None, help="where the random weights are made (default: the shape's)")
    args = p.parse_args(argv)
    device = args.device or SHAPES[args.shape].device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"paper_pair: --shape {args.shape} builds on CUDA, and this machine has none; pass --device cpu",
            file=sys.stderr,
        )
        return 2
    info = build(args.shape, args.out, device)
    print(
        f"paper_pair: {info['shape']}: teacher {info['params']['teacher'] / 1e9:.2f}B, student "
        f"{info['params']['student'] / 1e9:.2f}B parameters, vocabulary {info['vocab']}, in {info['seconds']} s "
        f"-> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
