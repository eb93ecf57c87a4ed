"""sekd/app/record.py: the run's last line names it by what it changes (its RunDir's name), not by its preset."""

from __future__ import annotations

from types import SimpleNamespace

from sekd.app.record import summary_line
from sekd.stores.runs import RunDir
from tests.helpers import compose_cfg


def test_the_summary_line_names_the_run_by_what_it_changes(tmp_path):
    typed = ["experiment=se_kd", "position.signal=kl", "seed=3", f"paths.root={tmp_path}"]
    tree = compose_cfg(typed)
    folder = RunDir(tree, typed)
    job = SimpleNamespace(cfg=SimpleNamespace(seed=3, preset=tree.preset), run=folder)
    line = summary_line(job, {"metrics": {"acc": 51.234, "ppl": 12.0, "other": 1.0}})
    assert line == f"sekd: se_kd (position.signal=kl) seed=3 -> {folder.eval_dir / 'record.json'}  acc=51.2  ppl=12"
    assert folder.path.name.startswith("se_kd-s3-")  # the folder keeps its preset's name; the line names the run
    plain = RunDir(compose_cfg(["experiment=top_kl", f"paths.root={tmp_path}"]), ["experiment=top_kl"])
    assert plain.name == "top_kl" and plain.path.name.startswith("top_kl-s1337-")
