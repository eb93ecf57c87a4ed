"""Evaluation (docs/method.md §11): lm-eval suites, local tasks from held-out prose, calibration error, scoring."""
