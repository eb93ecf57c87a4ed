"""Hydra sweeper plugin for sekd (found by Hydra's scan of the `hydra_plugins` namespace)."""
