"""Every test runs offline: set before any Hugging Face package is imported."""
import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter):
    """Tests skipped for want of Slurm are repeated last, in a banner: a green run that did not test the
    Slurm path must say so (tests/test_slurm.py)."""
    reasons = sorted({str(r.longrepr[2]) for r in terminalreporter.stats.get("skipped", [])
                      if isinstance(r.longrepr, tuple) and "SLURM TESTS NOT RUN" in str(r.longrepr[2])})
    for reason in reasons:
        terminalreporter.write_sep("!", "Slurm path untested", yellow=True, bold=True)
        terminalreporter.write_line(reason.removeprefix("Skipped: "), yellow=True, bold=True)
