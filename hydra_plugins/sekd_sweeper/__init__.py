"""Hydra sweeper plugin for sekd (found by Hydra's scan of the `hydra_plugins` namespace)."""

import sekd.schema  # noqa: F401,E402  (Hydra's plugin scan registers the config schema, whoever composes conf/)
