"""A real Slurm: the one-node cluster of scripts/slurm-local.sh runs sweeps through hydra/launcher=slurm.

`make test` installs Slurm where it can (root with apt-get). Where it cannot, the tests that need the
cluster skip, loudly, saying how to run them; SEKD_REQUIRE_SLURM=1 (CI sets it) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sekd.stores.runs import config_hash

from sekd.app.checks import typed, validate
from sekd.app.compose import job_threads
from tests.helpers import ROOT, compose_cfg, sekd_train, tiny_cache

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
REQUIRE = "SEKD_REQUIRE_SLURM"  # =1: a machine that cannot run the cluster fails these tests
NOT_RUN = "SLURM TESTS NOT RUN"  # tests/conftest.py repeats such skips at the end of the run
HOW = (
    "to run them, as root on Debian: `make test` (it installs Slurm), or `scripts/slurm-local.sh install` "
    "then `.venv/bin/pytest tests/test_slurm.py`"
)
SMOKE = ["--config-dir", "sweeps", "--config-name", "smoke_slurm"]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def compose_sweep(name: str, overrides: list[str] = (), hydra_node: bool = True):
    """A sweep file as the CLI composes it (`--config-dir sweeps` beside the app's conf/)."""
    return compose_cfg(
        [f"hydra.searchpath=[file://{ROOT / 'conf'}]", *overrides],
        config_dir=ROOT / "sweeps",
        name=name,
        hydra_node=hydra_node,
    )


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_configs_give_each_job_one_thread_per_cpu(launcher, target, monkeypatch):
    monkeypatch.setenv("SEKD_SLURM_PARTITION", "gpu-short")
    cfg = compose_sweep("demo", [f"hydra/launcher={launcher}"])
    lc = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert lc["_target_"] == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert lc["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))
    env = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=True)
    assert lc["cpus_per_task"] == 1
    if launcher == "local":  # every cell at once on this machine: one thread each
        assert env["OMP_NUM_THREADS"] == "1"
    assert env["DISABLE_MULTIPROC"] == "1"  # lm-eval's SIGTERM-ended pool hangs under submitit's handlers
    if launcher == "slurm":
        assert lc["partition"] == "gpu-short" and lc["gpus_per_node"] == 0
        assert lc["max_num_timeout"] > 0 and lc["mem_gb"] and lc["timeout_min"]


def test_the_profile_sizes_each_slurm_job(monkeypatch):
    def hydra_node(overrides):
        h = compose_sweep("t2", overrides).hydra
        return {
            "launcher": OmegaConf.to_container(h.launcher, resolve=True),
            "job": {"env_set": OmegaConf.to_container(h.job.env_set, resolve=True)},
        }

    embedded = hydra_node(["hydra/launcher=slurm"])
    paper = hydra_node(["hydra/launcher=slurm", "profile=paper"])
    size = lambda h: {
        k: h["launcher"][k] for k in ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism")
    }
    assert size(embedded) == {
        "gpus_per_node": 0,
        "cpus_per_task": 1,
        "mem_gb": 4,
        "timeout_min": 60,
        "array_parallelism": 64,
    }
    assert size(paper) == {
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 96,
        "timeout_min": 1440,
        "array_parallelism": 8,
    }
    assert "OMP_NUM_THREADS" not in paper["job"]["env_set"]  # the job resolves env_set without our keys
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # what Slurm tells a job with cpus_per_task=8
    assert job_threads(typed(compose_cfg(["experiment=se_kd"]))) == 8
    assert job_threads(typed(compose_cfg(["experiment=se_kd", "train.threads=2"]))) == 2
    custom = compose_sweep("t2", ["hydra/launcher=slurm", "profile=paper", "resources.gpus=2"])
    assert custom.hydra.launcher.gpus_per_node == 2
    a, b = (compose_sweep("t2", ["experiment=se_kd", *o], hydra_node=False) for o in ([], ["resources.gpus=2"]))
    assert config_hash(a) == config_hash(b)  # what a job asks the cluster for is not part of its result


def test_a_job_asks_for_one_task_per_gpu_on_each_of_its_nodes():
    def shape(*overrides):
        lc = OmegaConf.to_container(
            compose_sweep("t2", ["hydra/launcher=slurm", *overrides]).hydra.launcher, resolve=True
        )
        return lc["nodes"], lc["tasks_per_node"], lc["gpus_per_node"], lc["cpus_per_task"]

    assert shape() == (1, 1, 0, 1)  # a CPU job: one task, as before
    assert shape("profile=paper") == (1, 1, 1, 8)
    assert shape("resources.gpus=4", "resources.nodes=2") == (2, 4, 4, 1)  # 8 ranks over 2 nodes
    assert shape("resources.tasks_per_node=2") == (1, 2, 0, 1)  # 2 one-CPU ranks on a CPU node
    assert shape("resources.gpus=8", "resources.tasks_per_node=1") == (1, 1, 8, 1)  # one process, eight GPUs


def test_the_paper_profile_has_an_eight_gpu_variant_with_the_same_global_batch():
    lc = OmegaConf.to_container(
        compose_sweep("t2", ["hydra/launcher=slurm", "profile=paper_8gpu"]).hydra.launcher, resolve=True
    )
    assert (lc["nodes"], lc["tasks_per_node"], lc["gpus_per_node"]) == (1, 8, 8)
    one, eight = (
        compose_sweep("t2", ["experiment=se_kd", f"profile={p}"], hydra_node=False) for p in ("paper", "paper_8gpu")
    )
    run = validate(eight)
    assert run.train.distributed == "ddp" and one.train.distributed == "none"
    ranks = eight.resources.nodes * eight.resources.tasks_per_node
    assert ranks == 8
    global_batch = lambda c, n: c.train.micro_batch_size * c.train.grad_accum * n
    assert global_batch(eight, ranks) == global_batch(one, 1) == 16  # the paper's batch (docs/method.md §12)
    for key in ("model", "data", "eval", "paths"):  # the same pair, data, suite and root as profile=paper
        assert eight[key] == one[key]


def test_smoke_sweep_has_two_tiny_cells_on_the_slurm_launcher():
    cfg = compose_sweep("smoke_slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    cells = cfg.hydra.sweeper.params.experiment.split(",")
    assert cells == ["full_kd", "se_kd"]
    for preset in cells:
        cell = compose_sweep("smoke_slurm", [f"experiment={preset}"], hydra_node=False)
        validate(cell)
        assert (cell.model.name, cell.data.seq_len, cell.train.steps, cell.eval.limit) == ("tiny", 64, 2, 16)
        assert cell.logging.wandb == "disabled"


def run_cluster_test_without_slurm(tmp_path, **env) -> subprocess.CompletedProcess:
    """One cluster test in a pytest of its own, on a PATH without Slurm's commands."""
    bare = tmp_path / "bin"
    bare.mkdir(exist_ok=True)
    for tool in ("bash", "sh", "git"):  # what the run may call, but no sbatch
        if shutil.which(tool):
            (bare / tool).symlink_to(shutil.which(tool))
    full = {k: v for k, v in os.environ.items() if k != REQUIRE}
    full.update(OFFLINE, PATH=f"{Path(sys.executable).parent}:{bare}", **env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__)),
            "-k",
            "train_and_score_run_as_separate",
        ],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_slurm_the_cluster_tests_skip_loudly_and_say_how(tmp_path):
    res = run_cluster_test_without_slurm(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 skipped" in res.stdout
    banner = res.stdout[res.stdout.index("!!") :]  # tests/conftest.py's closing banner
    assert f"{NOT_RUN}: Slurm is not installed" in banner and "scripts/slurm-local.sh install" in banner


def test_sekd_require_slurm_turns_the_skip_into_a_failure(tmp_path):
    res = run_cluster_test_without_slurm(tmp_path, **{REQUIRE: "1"})
    assert res.returncode == 1 and "1 error" in res.stdout, res.stdout[-3000:]
    assert f"{NOT_RUN}: Slurm is not installed" in res.stdout and f"{REQUIRE}=1 requires them" in res.stdout


def test_make_test_installs_slurm_where_it_can_and_ci_requires_it():
    """`make test` runs scripts/slurm-local.sh install as root with apt-get; .ci/run is `make lint`, then
    `make test` with SEKD_REQUIRE_SLURM=1 (and SEKD_REQUIRE_MOUNT=1: the storage faults' tmpfs), then the wheel."""
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "bash scripts/slurm-local.sh install" in dry.stdout and 'id -u)" = 0' in dry.stdout
    ci = [
        ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci[-3:] == ["make lint", f"{REQUIRE}=1 SEKD_REQUIRE_MOUNT=1 make test", "make wheel-check"]
    assert all(ln.startswith("export ") for ln in ci[:-3])


def test_the_cli_finds_the_launcher_configs_beside_a_sweep_dir():
    """`--config-dir sweeps` adds a search path; hydra/launcher/*.yaml are still found in the app's conf/."""
    res = sekd_train(
        [
            "--config-dir",
            "sweeps",
            "--config-name",
            "demo",
            "hydra/launcher=slurm",
            "--cfg",
            "hydra",
            "--package",
            "hydra.launcher",
        ],
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SlurmLauncher" in res.stdout and "max_num_timeout: 3" in res.stdout


def slurm_cli(*args: str, timeout: int = 30) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True).stdout


def submitted_jobs(root: Path) -> list[str]:
    """Slurm job ids of every sweep under root: submitit names its folders <job id>[_<array index>]."""
    return sorted({p.name.split("_")[0] for p in root.glob("hydra/*/.submitit/*") if p.is_dir()})


def why_no_cluster() -> str | None:
    """Why the local cluster cannot run here; None when it can."""
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()) or not shutil.which("sbatch"):
        return "Slurm is not installed"
    if os.geteuid() != 0:
        return "starting the local cluster needs root"
    return None


CONTROLLER_PID = Path("/run/slurmctld.pid")  # SlurmctldPidFile in the slurm.conf the script writes


class Cluster:
    """The local cluster of scripts/slurm-local.sh (its pid files and logs under `state`), with its controller
    stopped and started again on demand; `roots`: the paths.root of every test that submitted to it."""

    def __init__(self, state: Path) -> None:
        self.env = {**os.environ, "SEKD_SLURM_STATE": str(state)}
        self.roots: list[Path] = []

    def script(self, action: str) -> None:
        res = subprocess.run(["bash", str(SCRIPT), action], env=self.env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"scripts/slurm-local.sh {action} failed:\n{res.stdout}{res.stderr}"

    def cancel(self, roots: list[Path]) -> None:
        """Cancel whatever the sweeps under `roots` left in the queue."""
        jobs = [j for r in roots for j in submitted_jobs(r)]
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)

    @contextlib.contextmanager
    def controller_stopped(self):
        """slurmctld alone is stopped (slurmd and the jobs it runs go on), then started again, always."""
        pid = int(CONTROLLER_PID.read_text())
        os.kill(pid, signal.SIGTERM)
        try:
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and "Z" not in proc_state(pid):
                assert time.monotonic() < deadline, "slurmctld did not stop"
                time.sleep(0.1)
            yield
        finally:
            self.script("start")  # the controller again, and the node idle (resumed if Slurm drained it)

    def settle(self, root: Path, timeout: float = 90) -> None:
        """Wait until the jobs of root's sweeps have left the queue (an old array's cell, finished meanwhile,
        only skips), so the next test finds an idle node; cancel what is left after `timeout`."""
        jobs = set(submitted_jobs(root))
        deadline = time.monotonic() + timeout
        while jobs and time.monotonic() < deadline:
            queued = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, timeout=30)
            if not jobs & set(queued.stdout.split()):
                return
            time.sleep(1)
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def started_cluster(tmp_path_factory):
    """tests/conftest.slurm_cluster: starts the local cluster (or finds one running), yields it, then cancels
    the jobs its tests submitted and stops only the daemons it started. Skips (fails with
    SEKD_REQUIRE_SLURM=1) where it cannot run."""
    why = why_no_cluster()
    if why:
        message = f"{NOT_RUN}: {why}; {HOW}"
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{message} ({REQUIRE}=1 requires them)")
        pytest.skip(message)
    running = Cluster(tmp_path_factory.mktemp("slurm-state"))
    try:
        running.script("start")
        yield running
    finally:
        running.cancel(running.roots)
        running.script("stop")


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """The session's one cluster (started once for this module and tests/test_slurm_faults.py: both in the
    slurm unit, one worker); the jobs this module's tests submitted are cancelled at its end."""
    first = len(slurm_cluster.roots)
    yield slurm_cluster
    slurm_cluster.cancel(slurm_cluster.roots[first:])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One artifact cache for every job; the tiny pair copied into it (tests/helpers.tiny_cache), before any job
    starts."""
    return tiny_cache(tmp_path_factory, tmp_path_factory.mktemp("slurm") / "cache")


def sweep(root: Path, cache: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = sekd_train(
        [*SMOKE, f"paths.root={root}", f"paths.cache={cache}", *overrides], env={**OFFLINE, **(env or {})}, timeout=240
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def job_logs(root: Path, sweep_dir: Path | None = None) -> str:
    base = sweep_dir or root / "hydra"
    return "".join(p.read_text() for p in sorted(base.glob("**/.submitit/*/*_log.out")))


def test_train_and_score_run_as_separate_slurm_jobs_and_a_finished_sweep_submits_nothing(cluster, cache, tmp_path):
    cluster.roots.append(tmp_path)
    trained = sweep(tmp_path, cache, "stage=train")
    assert "2 cells: 0 already finished, 2 to run" in trained.stdout
    assert len(list(tmp_path.glob("runs/*/model/config.json"))) == 2
    assert not list(tmp_path.glob("runs/*/eval-*/record.json"))  # stage=train scores nothing
    train_jobs = submitted_jobs(tmp_path)

    sweep(tmp_path, cache, "stage=score")
    records = {p: json.loads(p.read_text()) for p in sorted(tmp_path.glob("runs/*/eval-*/record.json"))}
    assert sorted(r["preset"] for r in records.values()) == ["full_kd", "se_kd"]
    ids = [r["slurm_job_id"] for r in records.values()]
    assert all(ids) and len(set(ids)) == 2, ids  # each cell ran as its own Slurm job (array task)
    assert not set(ids) & set(train_jobs)  # scored by other jobs than the ones that trained
    assert sorted(r["slurm_array_task_id"] for r in records.values()) == ["0", "1"]
    for r in records.values():
        assert r["stage"] == "score" and r["steps"] == 2 and r["config"]["model"]["name"] == "tiny"
        assert r["metrics"]["acc"] >= 0
    jobs_before = submitted_jobs(tmp_path)

    before = {p: p.read_bytes() for p in records}
    for stage in ("score", "all", "train"):  # every stage of a finished sweep: nothing to submit
        again = sweep(tmp_path, cache, f"stage={stage}")
        assert "2 already finished, 0 to run" in again.stdout and "nothing to do" in again.stdout
    assert submitted_jobs(tmp_path) == jobs_before  # no new Slurm job
    assert sorted(tmp_path.glob("runs/*/eval-*/record.json")) == sorted(records)
    assert all(p.read_bytes() == b for p, b in before.items())  # no record rewritten


def preempt_mid_run(root: Path, cache: Path, *overrides: str) -> tuple[str, str]:
    """Runs one cell (full_kd, 5 steps a checkpoint) through the Slurm launcher, sends its job USR2 once the
    first checkpoint.pt is written, lets the requeued job start at once and waits for the sweep: (its output,
    the job id)."""
    args = [
        *SMOKE,
        f"paths.root={root}",
        f"paths.cache={cache}",
        "experiment=full_kd",
        "train.ckpt_every=5",
        *overrides,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sekd.train", *args],
        cwd=ROOT,
        env={**os.environ, **OFFLINE},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 240  # generous: the CPUs may be shared with other tests' processes
        while not any(root.glob("runs/*/checkpoint.pt")):  # trained 5 steps, saved, still training
            assert proc.poll() is None and time.time() < deadline, "no checkpoint.pt appeared"
            time.sleep(0.05)
        [job] = submitted_jobs(root)
        slurm_cli("scancel", "--signal=USR2", job)
        # Slurm holds a requeued job for about two minutes (BeginTime); let it start in a few seconds: started
        # at once, it can race the old allocation's teardown and die "non-startable: Job credential revoked"
        while slurm_cli("squeue", "-h", "-j", job, "-o", "%T").strip() != "PENDING":
            assert time.time() < deadline, "the job was not requeued"
            time.sleep(0.2)
        slurm_cli("scontrol", "update", f"JobId={job}", "StartTime=now+5")
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return out, job


def assert_resumed_once(root: Path, job: str, steps: int) -> dict:
    """The cell's one run resumed from its checkpoint and finished under the same job: its record."""
    logs = job_logs(root)
    assert "this job is preempted" in logs and f"Requeued job {job}" in logs
    assert "resumed from step" in logs
    [run] = root.glob("runs/*")
    [record] = [json.loads(p.read_text()) for p in run.glob("eval-*/record.json")]
    assert record["slurm_job_id"] == job and record["steps"] == steps
    logged = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(5, steps + 1, 5))  # the redone steps were logged once
    assert not (run / "checkpoint.pt").exists()
    return record


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(cluster, cache, tmp_path):
    """USR2 is the job's --signal (sent before a time-out, and on preemption with a grace time): submitit
    checkpoints the launcher's call and requeues the job; the requeued job runs the same cell and resumes
    from checkpoint.pt."""
    cluster.roots.append(tmp_path)
    _, job = preempt_mid_run(tmp_path, cache, "train.steps=150")
    assert_resumed_once(tmp_path, job, 150)


def test_a_preempted_two_task_job_requeues_once_and_both_ranks_resume(cluster, cache, tmp_path):
    """Every task of a 2-task job gets USR2: rank 0 checkpoints the call and requeues the job, rank 1 only
    logs that it does not (submitit); Slurm then ends both tasks. The requeued job keeps its id, so its ranks
    meet again at the same derived port (sekd.distributed.launch.job_port) and resume from rank 0's checkpoint.pt."""
    cluster.roots.append(tmp_path)
    _, job = preempt_mid_run(
        tmp_path, cache, "train.steps=40", "resources.tasks_per_node=2", "resources.cpus=1", "train.distributed=ddp"
    )
    record = assert_resumed_once(tmp_path, job, 40)
    assert record["world_size"] == 2
    [rank0], [rank1] = ([p.read_text() for p in tmp_path.glob(f"hydra/*/.submitit/*/*_{r}_log.out")] for r in (0, 1))
    assert f"Requeued job {job}" in rank0
    assert "Not checkpointing nor requeuing since I am a slave" in rank1 and "Requeued job" not in rank1
    assert rank0.count("resumed from step") == rank1.count("resumed from step") == 1  # both ranks, once each
    errors = "".join(p.read_text() for p in tmp_path.glob("hydra/*/.submitit/*/*_1_log.err"))
    assert "Traceback" not in rank1 + errors  # rank 1 left without a crash, though rank 0 left mid-step


LAB_CRITERION = """
import sekd
from sekd.selection.criteria import forward_kl


@sekd.criterion("lab_half_kl")
def lab_half_kl(s, t, y, *, temperature=1.0, row=None, u=None):
    return 0.5 * forward_kl(s, t, y, temperature=temperature)
"""


def test_a_two_task_job_trains_one_run_on_two_ranks_and_a_finished_sweep_of_them_submits_nothing(
    cluster, cache, tmp_path
):
    """resources.tasks_per_node=2: each cell is one Slurm job of 2 one-CPU tasks; each task is a rank that
    reads its place from Slurm's environment (sekd.distributed.launch) and joins the gloo process group. Its
    criterion is a researcher's (`plugins`): every task imports the plugin before it checks the config."""
    cluster.roots.append(tmp_path)
    (tmp_path / "lab_slurm.py").write_text(LAB_CRITERION)
    lab = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    two_ranks = ["resources.tasks_per_node=2", "resources.cpus=1", "train.distributed=ddp", "train.log_every=1"]
    two_ranks += ["plugins=[lab_slurm]", "criterion.name=lab_half_kl"]
    first = sweep(tmp_path, cache, *two_ranks, env=lab)
    assert "2 cells: 0 already finished, 2 to run" in first.stdout
    jobs = submitted_jobs(tmp_path)
    logs = sorted(p.name for p in tmp_path.glob("hydra/*/.submitit/*/*_log.out"))
    assert len(jobs) == 1 and len(logs) == 4, logs  # one array, 2 cells x 2 tasks
    assert {name.removesuffix("_log.out").rsplit("_", 1)[1] for name in logs} == {"0", "1"}
    runs = sorted(tmp_path.glob("runs/*"))
    assert len(runs) == 2  # one run per cell, not one per rank
    for run in runs:
        [record] = [json.loads(p.read_text()) for p in run.glob("eval-*/record.json")]
        assert record["world_size"] == 2 and record["steps"] == 2
        assert [(p["key"], p["module"]) for p in record["plugins"]] == [("criterion.name", "lab_slurm")]
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 2  # logged by rank 0 alone
    before = {p: p.read_bytes() for p in tmp_path.glob("runs/*/eval-*/record.json")}

    again = sweep(tmp_path, cache, *two_ranks, env=lab)
    assert "2 already finished, 0 to run" in again.stdout and "nothing to do" in again.stdout
    assert submitted_jobs(tmp_path) == jobs  # no new Slurm job
    assert all(p.read_bytes() == b for p, b in before.items())
