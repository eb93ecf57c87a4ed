"""The one-line errors every layer raises: a bad input (`sekd: config error: ...`, exit 2) and a fault that
arrives while the run works (`sekd: run fault: ...`, exit 3; docs/bad-inputs.md, "Faults while running")."""

CONFIG_EXIT = 2  # a bad input: nothing was built, loaded or written
FAULT_EXIT = 3  # a fault while the run worked: what it wrote is whole, and a re-run picks up from there


class ConfigError(ValueError):
    """One line: the offending key, what it holds, what is allowed."""


class RunFault(RuntimeError):
    """One line: what failed while the run worked (a file, a folder) and why; the app adds the remedy."""


class EchoedFault(RunFault):
    """Rank 0's run fault as another rank raises it: every rank stops with exit status 3, and rank 0 alone
    prints the line (sekd/app/faults.py reads `quiet`)."""

    quiet = True
