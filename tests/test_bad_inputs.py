"""Bad config values and keys: one line naming the key, exit status 2, before any model loads, nothing left
behind. Every row goes through `check_command_line` (what `sekd-train` runs before Hydra starts a job);
the rows marked CLI also run the real command in a subprocess. docs/bad-inputs.md lists every row.
File and environment errors are tests/test_bad_environment.py's."""

from __future__ import annotations

import re

import pytest

from sekd.core.errors import ConfigError

from sekd.app.checks import check_command_line
from tests.helpers import CONF, ROOT, TINY, sekd_train

TRAIN_KEYS = "allowed in train: betas, chunk_size, ckpt_every"
CLI = True

# (command line, what its one line must contain, also run as a real CLI)
ROWS = [
    # option values of registered pieces, checked against the types and ranges each declares
    (["position=pos_rs", "position.options.tau=0"], "position.options.tau=0 must be > 0 (policy 'pos_rs')", CLI),
    (["position=pos_rs_star", "position.options.coverage=2"], "position.options.coverage=2 must be in [0, 1]", False),
    (["position=pos_rs", "position.options.tau=nan"], "position.options.tau=nan must be a finite number", False),
    (["position=curriculum", "position.options.S=0"], "position.options.S=0 must be >= 1 (policy 'curriculum')", False),
    (["position=gls", "position.options.Q=0"], "position.options.Q=0 must be >= 1 (policy 'gls')", False),
    (["position=gls", "position.options.Q=abc"], "position.options.Q='abc' must be an integer (policy 'gls')", False),
    (["position=gls", "position.options.Q=1.5"], "position.options.Q=1.5 must be an integer", False),
    (
        ["classes=rs_kd", "classes.options.n_draws=0"],
        "classes.options.n_draws=0 must be >= 1 (class selector 'rs_kd')",
        False,
    ),
    (
        ["classes=top_k_truncation", "classes.options.top=0"],
        "classes.options.top=0 must be >= 1 (class selector 'top_k_truncation')",
        CLI,
    ),
    (
        ["criterion=atkd", "criterion.options.hard_fraction=2"],
        "criterion.options.hard_fraction=2 must be in [0, 1] (criterion 'atkd')",
        False,
    ),
    (
        ["criterion=atkd", "criterion.options.easy_weight=-0.5"],
        "criterion.options.easy_weight=-0.5 must be in [0, 1]",
        False,
    ),
    (
        ["criterion=dkd", "criterion.options.alpha=-1"],
        "criterion.options.alpha=-1 must be >= 0 (criterion 'dkd')",
        False,
    ),
    (
        ["criterion=dkd", "criterion.options.alpha=0", "criterion.options.beta=0"],
        "criterion.options.beta=0 must be > 0 when alpha=0",
        False,
    ),
    (
        ["position=top_k", "+position.options.tau=1"],
        "position.options.tau: policy 'top_k' takes no option 'tau'",
        False,
    ),
    (["position.options.S=4000"], "position.options.S: policy 'all' takes no option 'S'; allowed: none", False),
    (["position.options=5"], "position.options=5 must be a mapping of option: value ({} for none)", False),
    (["classes=rs_kd", "classes.options=null"], "classes.options=None must be a mapping of option: value", False),
    (
        ["classes=student_top_k", "classes.options.normalization=ghost"],
        "classes.options.normalization='ghost' must be one of: renormalized, raw, tail",
        False,
    ),
    # a teacher cache of what no cache can hold
    (
        ["classes=student_top_k", "classes.cache=auto"],
        "classes.cache: classes.name=student_top_k chooses its classes by the student's logits",
        False,
    ),
    (["classes=full", "classes.cache=auto"], "classes.cache holds a sparse target: it needs a class sampler", False),
    # a sparse target a criterion cannot read
    (
        ["classes=rs_kd", "criterion=reverse_kl"],
        "criterion.name='reverse_kl' cannot use draws targets (classes.name=rs_kd",
        CLI,
    ),
    (
        ["classes=top_p", "criterion=dkd"],
        "criterion.name='dkd' cannot use a sparse class target (classes.name=top_p); choose one of: forward_kl, reverse_kl",
        False,
    ),
    # values of plain keys
    (["train.betas=[2.0,3.0]"], "train.betas=[2.0, 3.0] must be two numbers [beta1, beta2], each in [0, 1)", False),
    (["train.betas=[0.9]"], "train.betas=[0.9] must be two numbers", False),
    (
        ["data.token_budget=100", "data.seq_len=128"],
        "data.token_budget=100 is less than one sequence of data.seq_len=128 tokens",
        CLI,
    ),
    (["seed=true"], "seed=True must be an integer", False),
    (["force=maybe"], "force='maybe' must be true or false", False),
    (["model.trust_remote_code=yes"], "model.trust_remote_code='yes' must be true or false", False),
    (["preset=a/b"], "preset='a/b' must be a plain name", False),
    # scaling out: the distributed mode, the teacher's device, the cluster's shape
    (["train.distributed=mpi"], "train.distributed='mpi' is not allowed; choose one of: none, ddp, fsdp", False),
    (
        ["+model.embedded.teacher.keep=best"],
        "model.embedded.teacher.keep='best' is not allowed; choose one of: last, best_validation",
        False,
    ),
    (["+model.embedded.student.eval_every=0"], "model.embedded.student.eval_every=0 must be an integer > 0", False),
    (["model.teacher_device=gpu1"], "model.teacher_device='gpu1' is not a device; use cpu, cuda or cuda:N", CLI),
    (["model.teacher_device=cuda:x"], "model.teacher_device='cuda:x' is not a device", False),
    (
        ["model.teacher_device=cpu", "train.distributed=ddp"],
        "model.teacher_device=cpu places the teacher of one process; with train.distributed=ddp each rank",
        CLI,
    ),
    (["resources.nodes=0"], "resources.nodes=0 must be an integer > 0", False),
    (["resources.tasks_per_node=0"], "resources.tasks_per_node=0 must be an integer > 0", False),
    # a value of the wrong type, refused by Hydra against the schema (sekd/config/schema.py) while composing
    (["train.lr=abc"], "train.lr='abc' must be a number", CLI),
    (["data.seq_len=abc"], "data.seq_len='abc' must be an integer > 0", False),
    (["eval.limit=1.5"], "eval.limit=1.5 must be an integer", False),
    (["train.betas=abc"], "train.betas='abc' must be a list", False),
    (["regime=on_policy", "data=arith", "regime.mix=2"], "regime.mix=2.0 must be a fraction in [0, 1]", False),
    # unknown keys, set or appended, in a single run or a multirun: the allowed keys of their node
    (["train.learning_rate=0.1"], f"unknown key 'train.learning_rate'; {TRAIN_KEYS}", CLI),
    (["+train.learning_rate=0.1"], f"unknown key 'train.learning_rate'; {TRAIN_KEYS}", CLI),
    (["-m", "train.learning_rate=0.1", "seed=1,2"], f"unknown key 'train.learning_rate'; {TRAIN_KEYS}", CLI),
    (["model.nam=x"], "unknown key 'model.nam'; allowed in model: embedded, name,", False),
    (["regime.mix=0.5"], "unknown key 'regime.mix'; allowed in regime: name", False),  # off-policy has no mix
    (["+eval.suit=paper"], "unknown key 'eval.suit'; allowed in eval: batch_size, device, limit,", False),
    (["learning_rate=0.1"], "unknown key 'learning_rate'; allowed in the top level: classes, criterion,", False),
    (["hydra.job.nam=x"], "unknown key 'hydra.job.nam'; allowed in hydra.job: chdir,", False),
    # what Hydra refuses while composing, folded into one line
    (
        ["experiment=nope"],
        "Could not find 'experiment/nope'; Available options in 'experiment': at_kd, curriculum,",
        False,
    ),
    (["seed=1,2"], "Ambiguous value for argument 'seed=1,2'", False),
    (["train.lr=["], "cannot parse the override 'train.lr=['", False),
]


def ids(rows):
    return [" ".join(r[0]) for r in rows]


@pytest.mark.parametrize("argv,message,_", ROWS, ids=ids(ROWS))
def test_bad_input_is_refused_with_one_line_naming_it(tmp_path, argv, message, _):
    with pytest.raises(ConfigError) as err:
        check_command_line([*argv, f"paths.root={tmp_path}/root", f"paths.cache={tmp_path}/cache"], str(CONF), "config")
    line = str(err.value)
    assert "\n" not in line and message in line, line
    assert not any(tmp_path.iterdir())


CLI_ROWS = [r for r in ROWS if r[2]]


@pytest.mark.parametrize("argv,message,_", CLI_ROWS, ids=ids(CLI_ROWS))
def test_sekd_train_refuses_bad_input_before_anything_runs(tmp_path, argv, message, _):
    flags = [a for a in argv if a.startswith("-")]  # -m before the overrides, as a user types it
    res = sekd_train(
        [
            *flags,
            *TINY,
            *[a for a in argv if a not in flags],
            f"paths.root={tmp_path}/root",
            f"paths.cache={tmp_path}/cache",
        ],
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sekd: config error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "distill" not in res.stdout + res.stderr
    assert not any(tmp_path.iterdir()), sorted(tmp_path.rglob("*"))  # no run folder, no log, no model cache


def test_the_docs_list_every_bad_input():
    doc = (ROOT / "docs" / "bad-inputs.md").read_text()
    for argv, message, _ in ROWS:
        row = " ".join(argv)
        assert f"`{row}`" in doc, f"docs/bad-inputs.md lacks the row for `{row}`"
        assert re.search(re.escape(message[:30]), doc), f"docs/bad-inputs.md lacks the message for `{row}`"
