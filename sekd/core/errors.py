"""The one-line error every layer raises for bad input (the app prints `sekd: config error: ...` and exits 2)."""


class ConfigError(ValueError):
    """One line: the offending key, what it holds, what is allowed."""
