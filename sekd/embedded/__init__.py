"""The embedded default's models: a tokenizer and tiny Qwen3 models built from the embedded corpus (sekd.data.corpus)."""
