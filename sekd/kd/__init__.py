"""The selective KD objective (docs/method.md §2)."""
