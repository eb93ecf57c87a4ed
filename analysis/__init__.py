"""Analyses that read models, data and results; they never train."""
