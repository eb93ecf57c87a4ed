"""The embedded default: a corpus every CPython carries, a tokenizer and tiny Qwen3 models built from it."""
