"""What a run prints: one line per cell and sekd's own progress bars. The libraries' loading bars (weights,
shards, dataset splits) and their INFO lines stay off unless logging.verbose=true; lm-eval's go to the
scores folder's lm_eval.log (sekd.evaluation.score)."""

from __future__ import annotations

import os
import sys


def quiet_libraries(verbose: bool) -> None:
    """Hugging Face libraries' progress bars and INFO/WARNING chatter off (verbose=False) or on."""
    if verbose:
        os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    else:  # read when `datasets` is first imported (by lm-eval, at scoring)
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    if verbose:
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:  # imported already: the variable above came too late for it
        import datasets

        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
