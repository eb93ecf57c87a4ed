"""sekd-lab's config groups, a package so Hydra finds them as pkg://sekd_lab.conf when not installed."""
