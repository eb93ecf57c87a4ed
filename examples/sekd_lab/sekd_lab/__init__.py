"""sekd-lab: a worked example of pieces from a researcher's own package (see its README)."""

__version__ = "0.1.0"
