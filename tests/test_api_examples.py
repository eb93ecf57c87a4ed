"""docs/api.md's examples are real: its registration blocks, run as one user module in a fresh process,
register every piece they show, and each passes sekd.testing as the built-ins do (one process; the kit's own
tests run a user's module on two ranks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import ROOT

PAGE = ROOT / "docs" / "api.md"
SHOWN = {"signal": ["disagreement_margin"], "policy": ["stride"], "criterion": ["half_kl"], "class_sampler": ["top_8"]}

CHECK = """
import api_examples
from sekd.data.sources import SOURCES
from sekd.selection.samples import SAMPLE_SELECTORS
from sekd.testing import check_piece, pieces_of

pieces = sorted(pieces_of("api_examples"))
print(pieces)
for kind, name in pieces:
    check_piece(kind, name, ranks=False)
assert "low_margin" in SAMPLE_SELECTORS and SAMPLE_SELECTORS.origin("low_margin") == "api_examples"
assert "my_corpus" in SOURCES and SOURCES.origin("my_corpus") == "api_examples"
"""


def registration_blocks() -> str:
    """The page's python blocks between "Registering a piece" and "Loading your pieces", in order."""
    text = PAGE.read_text()
    section = text[text.index("## Registering a piece") : text.index("## Loading your pieces")]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def test_every_example_of_the_api_page_registers_and_passes_the_kit(tmp_path):
    (tmp_path / "api_examples.py").write_text(registration_blocks())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    shown = sorted((kind, name) for kind, names in SHOWN.items() for name in names)
    assert res.stdout.strip() == str(shown)
