"""analysis/*.ipynb: each notebook runs headless (nbclient, the venv's python3 kernel) against synthetic
record.json files / CSVs in tmp_path and saves valid PNGs; with no sweep or no data it says so instead of failing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
ANALYSIS = ROOT / "analysis"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 120  # seconds per cell; a notebook here takes a few seconds


# ---- the kernel -----------------------------------------------------------------------------


def _kernel_python(spec_argv: list[str]) -> str:
    """The interpreter a kernelspec starts: jupyter_client runs a bare `python` as the current interpreter."""
    exe = spec_argv[0]
    return sys.executable if exe in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"} else exe


@pytest.fixture(scope="session")
def python3_kernel():
    """'python3', made sure to name a kernelspec that starts this interpreter (the venv's).

    On a fresh `pip install -e .[dev]` it already does: ipykernel's wheel puts the spec in
    <venv>/share/jupyter/kernels/python3 (and jupyter_client falls back to ipykernel's own copy when it
    is missing); its argv starts with a bare `python`, which jupyter_client replaces with the running
    interpreter. The environment's specs are preferred over a user's (~/.local/share/jupyter) for the
    session; if 'python3' still resolves elsewhere, the spec is installed into this environment with
    `ipykernel install --sys-prefix` (idempotent) before giving up.
    """
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def resolved() -> Path | None:
        try:
            return Path(_kernel_python(KernelSpecManager().get_kernel_spec("python3").argv)).resolve()
        except NoSuchKernel:
            return None

    me = Path(sys.executable).resolve()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # this environment's kernelspecs before the user's
        if resolved() != me:
            subprocess.run(
                [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                check=True,
                capture_output=True,
            )
        if resolved() != me:
            pytest.fail(
                f"kernelspec 'python3' starts {resolved()}, not {me} "
                f"(spec: {KernelSpecManager().find_kernel_specs().get('python3')})"
            )
        yield "python3"


def execute(name: str, kernel: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run analysis/<name>.ipynb top to bottom in analysis/ (as Jupyter would); return its text outputs."""
    for k, v in {"MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1", **env}.items():
        monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
    nb = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT, kernel_name=kernel, resources={"metadata": {"path": str(ANALYSIS)}}
    )
    client.execute()
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") if o.get("output_type") == "stream" else json.dumps(o.get("data", {}))[:2000])
    return out


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a PNG"
    assert not list(path.parent.glob("*.tmp")), "a temp file was left behind"


# ---- synthetic results, in the schema sekd/app/record.py writes ---------------------------------

SEEDS = (1337, 1338)


def record(
    preset: str,
    label: str,
    seed: int,
    *,
    mode: str = "distill",
    k: float = 1.0,
    l: float = 1.0,
    acc: float = 60.0,
    wall: float = 100.0,
    teacher_tokens: int | None = 1000,
    cache_bytes: int = 0,
    split: str = "test",
) -> dict:
    """A record.json as sekd/app/record.py writes it (the fields the analysis reads, and the usual others)."""
    h = hashlib.sha256(repr((preset, seed, k, l, split)).encode()).hexdigest()[:12]
    costs = (
        {}
        if mode != "distill"
        else {
            "teacher_loaded": teacher_tokens > 0,
            "prepass_seconds": 0.0,
            "prepass_reused": False,
            "prepass_forward_tokens": {},
            "cache_build_seconds": 0.0,
            "cache": None,
            "cache_bytes_read": cache_bytes,
            "teacher_forward_tokens": teacher_tokens,
        }
    )
    return {
        "preset": preset,
        "label": label,
        "mode": mode,
        "seed": seed,
        "config_hash": h,
        "run_dir": f"outputs/x/runs/{preset}-s{seed}-{h}",
        "model": "m",
        "metrics": {"acc": acc, "ppl": 10.0, "ece": 20.0, "sekd_choice_test/acc": acc / 100},
        "tokens_seen": 4096,
        "tokens_supervised": int(4096 * k),
        "steps": 10,
        "train_time_s": wall - 5,
        "costs": costs,
        "train_samples": 100,
        "available_samples": 100,
        "wall_time_s": wall,
        "peak_memory_mb": 800.0,
        "git_commit": "0" * 40,
        "overrides": [f"experiment={preset}", f"seed={seed}"],
        "config": {
            "preset": preset,
            "label": label,
            "mode": mode,
            "seed": seed,
            "position": {
                "k": k,
                "policy": "top_k" if k < 1 else "all",
                "signal": None,
                "normalization": "sum",
                "options": {},
            },
            "samples": {"l": l, "name": "all" if l == 1 else "top_student_entropy", "batch_size": 16},
            "classes": {"name": "all", "cache": None, "options": {}},
            "train": {"flow": "chunked"},
            "model": {"name": "embedded"},
            "eval": {"suite": "embedded", "split": split, "limit": None},
        },
        "slurm_job_id": None,
        "slurm_array_task_id": None,
        "host": "test",
        "finished_at": f"2026-01-01T00:00:{seed % 60:02d}+0000",
    }


def write(root: Path, rec: dict) -> None:
    d = root / "runs" / f"{rec['preset']}-s{rec['seed']}-{rec['config_hash']}"
    d.mkdir(parents=True)
    (d / "record.json").write_text(json.dumps(rec, indent=2))


def write_grid(root: Path, sweeps: bool = True, split: str = "test") -> Path:
    """Student, teacher, Full KD; with `sweeps`, SE-KD and RandomPos over k and SE-KD3X over l."""
    for s, seed in enumerate(SEEDS):
        write(
            root,
            record(
                "student",
                "Student (no distillation)",
                seed,
                mode="score_student",
                acc=50.0,
                wall=5,
                teacher_tokens=None,
                split=split,
            ),
        )
        write(
            root,
            record(
                "teacher", "Teacher", seed, mode="score_teacher", acc=70.0, wall=6, teacher_tokens=None, split=split
            ),
        )
        write(root, record("full_kd", "Full KD", seed, acc=62.0 + s, wall=200, teacher_tokens=10_000, split=split))
        ks = (0.05, 0.1, 0.2, 0.5) if sweeps else (0.2,)
        for k in ks:
            write(
                root,
                record(
                    "se_kd",
                    "SE-KD",
                    seed,
                    k=k,
                    acc=60 + 4 * k + s,
                    wall=150 + 50 * k,
                    teacher_tokens=10_000,
                    split=split,
                ),
            )
            write(
                root,
                record(
                    "random_pos",
                    "RandomPos",
                    seed,
                    k=k,
                    acc=55 + 8 * k + s,
                    wall=140 + 50 * k,
                    teacher_tokens=10_000,
                    split=split,
                ),
            )
        for l in (0.1, 0.2, 0.5) if sweeps else (0.2,):
            write(
                root,
                record(
                    "se_kd3x",
                    "SE-KD3X",
                    seed,
                    k=0.2,
                    l=l,
                    acc=58 + 6 * l + s,
                    wall=40 + 100 * l,
                    teacher_tokens=int(10_000 * l) if s == 0 else 0,
                    cache_bytes=int(1e6 * l),
                    split=split,
                ),
            )
    return root


# ---- the notebooks ----------------------------------------------------------------------------


def test_budget_curves_notebook(tmp_path, python3_kernel, monkeypatch):
    results, figs = write_grid(tmp_path / "results"), tmp_path / "figs"
    execute("budget_curves", python3_kernel, {"SEKD_RESULTS": str(results), "SEKD_FIGURES": str(figs)}, monkeypatch)
    assert_png(figs / "k_budget.png")
    assert_png(figs / "l_budget.png")


def test_budget_curves_notebook_without_sweeps_says_so(tmp_path, python3_kernel, monkeypatch):
    results, figs = write_grid(tmp_path / "results", sweeps=False), tmp_path / "figs"
    out = execute(
        "budget_curves", python3_kernel, {"SEKD_RESULTS": str(results), "SEKD_FIGURES": str(figs)}, monkeypatch
    )
    text = "\n".join(out)
    assert "no method was run at two or more values of k" in text and "values of l" in text
    assert not (figs / "k_budget.png").exists() and not (figs / "l_budget.png").exists()


def test_budget_curves_notebook_keeps_to_one_setting(tmp_path, python3_kernel, monkeypatch):
    """The default grid scored on test, the sweeps on validation (as in outputs/embedded): the curves use
    the validation runs only (averaging across splits would raise inside plots.budget_curve)."""
    results = write_grid(tmp_path / "results", sweeps=False, split="test")
    write_grid(results, sweeps=True, split="validation")
    figs = tmp_path / "figs"
    out = execute(
        "budget_curves", python3_kernel, {"SEKD_RESULTS": str(results), "SEKD_FIGURES": str(figs)}, monkeypatch
    )
    assert "(setting: embedded embedded/validation)" in "\n".join(out)
    assert_png(figs / "k_budget.png")


def test_pareto_notebook(tmp_path, python3_kernel, monkeypatch):
    results, figs = write_grid(tmp_path / "results"), tmp_path / "figs"
    execute("pareto", python3_kernel, {"SEKD_RESULTS": str(results), "SEKD_FIGURES": str(figs)}, monkeypatch)
    for cost in ("train_wall_s", "teacher_forward_tokens", "cache_bytes_read"):
        assert_png(figs / f"pareto_{cost}.png")


def test_pareto_notebook_plots_throughput_per_device_when_world_sizes_differ(tmp_path, python3_kernel, monkeypatch):
    """SE-KD's runs on 2 ranks, the others on 1 (sekd.app.record.throughput's fields): training time does not
    compare, so the time figure is tokens/s per device, saying so; the token and byte costs are drawn as ever."""
    from sekd.app.record import throughput

    results, figs = write_grid(tmp_path / "results", sweeps=False), tmp_path / "figs"
    for path in results.glob("runs/*/record.json"):
        rec = json.loads(path.read_text())
        if rec["mode"] == "distill":
            world = 2 if rec["preset"] == "se_kd" else 1
            rec.update(
                throughput(
                    {
                        "tokens_seen": rec["tokens_seen"],
                        "train_time_s": rec["train_time_s"],
                        "world_size": world,
                        "devices": {"student": "cpu", "teacher": "cpu"},
                    }
                )
            )
            path.write_text(json.dumps(rec, indent=2))
    out = "\n".join(
        execute("pareto", python3_kernel, {"SEKD_RESULTS": str(results), "SEKD_FIGURES": str(figs)}, monkeypatch)
    )
    assert "runs on [1, 2] devices: tokens_per_s_device (more is better) instead of train_wall_s" in out
    for cost in ("tokens_per_s_device", "teacher_forward_tokens", "cache_bytes_read"):
        assert_png(figs / f"pareto_{cost}.png")
    assert not (figs / "pareto_train_wall_s.png").exists()


def test_pareto_notebook_on_a_report_csv(tmp_path, python3_kernel, monkeypatch):
    """A results.csv from sekd-report carries each run's costs and config: the same figures as the folders."""
    from sekd.report.results import load_records

    results = write_grid(tmp_path / "results", sweeps=False)
    csv = tmp_path / "results.csv"
    load_records([results]).to_csv(csv, index=False)
    figs = tmp_path / "figs"
    out = execute("pareto", python3_kernel, {"SEKD_RESULTS": str(csv), "SEKD_FIGURES": str(figs)}, monkeypatch)
    for cost in ("train_wall_s", "teacher_forward_tokens", "cache_bytes_read"):
        assert_png(figs / f"pareto_{cost}.png")
    assert "setting 'embedded embedded/test'" in "\n".join(out)


def test_relative_sekd_paths_are_taken_from_where_the_command_ran(tmp_path, python3_kernel):
    """`cd somewhere && SEKD_RESULTS=results SEKD_FIGURES=figs jupyter ...`: the kernel starts in analysis/, the
    paths still mean somewhere/results and somewhere/figs."""
    write_grid(tmp_path / "results")
    script = (
        "import nbclient, nbformat; "
        f"nb = nbformat.read({str(ANALYSIS / 'pareto.ipynb')!r}, as_version=4); "
        f"nbclient.NotebookClient(nb, timeout={TIMEOUT}, kernel_name={python3_kernel!r}, "
        f"resources={{'metadata': {{'path': {str(ANALYSIS)!r}}}}}).execute()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKD_")}
    res = subprocess.run(
        [
            "bash",
            "-c",
            f'cd "{tmp_path}" && SEKD_RESULTS=results SEKD_FIGURES=figs '
            f'MPLBACKEND=Agg JUPYTER_PREFER_ENV_PATH=1 "{sys.executable}" -c "$0"',
            script,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_png(tmp_path / "figs" / "pareto_train_wall_s.png")
    assert not (ANALYSIS / "figs").exists()


def test_signal_overlap_notebook(tmp_path, python3_kernel, monkeypatch):
    import numpy as np
    import pandas as pd

    names = ["student_entropy", "kl", "random", "ce_ratio_plus_student_entropy"]
    J = np.array([[1, 0.5, 0.1, 0.6], [0.5, 1, 0.1, 0.3], [0.1, 0.1, 1, 0.1], [0.6, 0.3, 0.1, 1]])
    csv = tmp_path / "overlap.csv"
    pd.DataFrame(J, index=names, columns=names).to_csv(csv, float_format="%.6f")  # as analysis.overlap --csv does
    figs = tmp_path / "figs"
    out = execute(
        "signal_overlap", python3_kernel, {"SEKD_OVERLAP_CSV": str(csv), "SEKD_FIGURES": str(figs)}, monkeypatch
    )
    assert_png(figs / "signal_overlap.png")
    assert "4 signals" in "\n".join(out)


def test_signal_overlap_notebook_without_a_matrix_says_so(tmp_path, python3_kernel, monkeypatch):
    figs = tmp_path / "figs"
    out = execute(
        "signal_overlap",
        python3_kernel,
        {"SEKD_OVERLAP_CSV": str(tmp_path / "missing.csv"), "SEKD_FIGURES": str(figs)},
        monkeypatch,
    )
    assert "no overlap matrix" in "\n".join(out)
    assert not (figs / "signal_overlap.png").exists()


def test_notebooks_are_stored_without_outputs():
    """Committed notebooks carry no outputs or execution counts (small diffs, no stale figures)."""
    for path in sorted(ANALYSIS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_sparse_targets_notebook(tmp_path, python3_kernel, monkeypatch):
    """The table analysis.sparse_targets writes (here from random logits): the headline and the plot."""
    import torch

    from analysis import sparse_targets as st

    g = torch.Generator().manual_seed(0)
    t = 2 * torch.randn(16, 40, generator=g, dtype=torch.float64)
    grid = st.settings(["rs_kd", "top_k_truncation", "top_p"], k=[1, 4, 16], p=[0.5, 0.9], n=[2, 8])
    csv = tmp_path / "sparse_targets.csv"
    st.sweep_targets(t + torch.randn(16, 40, generator=g, dtype=torch.float64), t, grid, draws=3).to_csv(
        csv, index=False
    )
    figs = tmp_path / "figs"
    out = execute(
        "sparse_targets", python3_kernel, {"SEKD_SPARSE_CSV": str(csv), "SEKD_FIGURES": str(figs)}, monkeypatch
    )
    assert_png(figs / "sparse_targets.png")
    text = "\n".join(out)
    assert "16 positions" in text and "top_k_truncation normalization=raw" in text


def test_sparse_targets_notebook_without_a_table_says_so(tmp_path, python3_kernel, monkeypatch):
    figs = tmp_path / "figs"
    out = execute(
        "sparse_targets",
        python3_kernel,
        {"SEKD_SPARSE_CSV": str(tmp_path / "missing.csv"), "SEKD_FIGURES": str(figs)},
        monkeypatch,
    )
    assert "no table at" in "\n".join(out)
    assert not (figs / "sparse_targets.png").exists()
