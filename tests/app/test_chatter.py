"""A run's console: one line per cell and sekd's own bars; lm-eval's INFO lines, prints and bars go to the
scores folder's lm_eval.log, the Hugging Face loading bars stay off; logging.verbose=true brings them back."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import TINY, sekd_train, tiny_cache

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def score_student(root: Path, *extra: str):
    res = sekd_train(
        [*TINY, "experiment=student", "eval.limit=8", f"paths.root={root}", f"paths.cache={root.parent}/cache", *extra],
        env=OFFLINE,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_the_console_holds_one_line_per_run_and_lm_eval_writes_to_its_log(tmp_path_factory, tmp_path):
    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it
    quiet = score_student(tmp_path / "quiet")
    console = quiet.stdout + quiet.stderr
    assert "lm_eval" not in console and "Loading weights" not in console and "bootstrapping" not in console
    assert [ln for ln in quiet.stdout.splitlines() if ln.startswith("sekd: student")], quiet.stdout
    (log,) = (tmp_path / "quiet").glob("runs/*/eval-*/lm_eval.log")
    assert "lm_eval.evaluator INFO" in log.read_text() and "Running loglikelihood requests" in log.read_text()

    loud = score_student(tmp_path / "loud", "logging.verbose=true")
    console = loud.stdout + loud.stderr
    assert "[lm_eval.evaluator][INFO]" in console and "Running loglikelihood requests" in console
    assert not list((tmp_path / "loud").glob("runs/*/eval-*/lm_eval.log"))


def test_a_verbose_that_is_not_a_flag_is_refused_in_one_line(tmp_path):
    res = sekd_train([*TINY, "experiment=student", "logging.verbose=loud", f"paths.root={tmp_path}"], env=OFFLINE)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("sekd: config error:") and "logging.verbose" in res.stderr
