"""Offline teacher cache: RS-KD class draws per sample and position, content-keyed and verifiable."""
