"""Setuptools' build hook (everything else is in pyproject.toml): the configs (conf/) and the sweeps (sweeps/)
ship inside the wheel as sekd/conf and sekd/sweeps, so an installed sekd composes its runs from any folder.
An editable install reads the checkout's own folders (sekd.config.folders)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder in ("conf", "sweeps"):
            target = Path(self.build_lib) / "sekd" / folder
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithConfigs})
