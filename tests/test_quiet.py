"""``quiet_notebook`` turns off what would flood a notebook's outputs, and can run first.

It runs in a child interpreter: the switches it flips are process-wide.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CHILD = r"""
import logging, sys, warnings
from lmref.lab.quiet import quiet_notebook
heavy = [m for m in ("transformers", "datasets", "bitsandbytes") if m in sys.modules]
assert not heavy, f"importing lmref.lab.quiet imported {heavy}: it must be able to come first"
quiet_notebook()
import datasets
from transformers.utils import logging as hf_logging
assert not datasets.is_progress_bar_enabled(), "datasets' bars are still on"
assert not hf_logging.is_progress_bar_enabled(), "transformers' bars are still on"
level = logging.getLogger("bitsandbytes.backends.cpu.ops").level
assert level == logging.ERROR, f"bitsandbytes' CPU notice logger at level {level}"
ignored = [f for f in warnings.filters if f[0] == "ignore" and f[1] is not None]
assert any(f[1].match("IProgress not found. Please update jupyter") for f in ignored), "tqdm's warning"
print("quiet")
"""


def test_quiet_notebook_turns_off_bars_and_notices_and_imports_nothing_heavy():
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "quiet"
