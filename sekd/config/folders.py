"""Where the configs and sweeps are: inside the installed package (a wheel ships them as sekd/conf and
sekd/sweeps, setup.py), else the checkout's conf/ and sweeps/ (an editable install, or a clone)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # sekd/


def config_folder(name: str) -> str:
    """`conf` or `sweeps`, as an absolute path."""
    shipped = PACKAGE / name
    return str(shipped if shipped.is_dir() else PACKAGE.parent / name)


CONF = config_folder("conf")
SWEEPS = config_folder("sweeps")
