"""The selective KD objective (SPEC §2)."""
