"""lmref.data.clean.deduplicate on one huge document: memory stays bounded (measured in a child
process, so the peak is the dedup's own and not the test runner's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

HUGE_LINE = """
import json, random, resource, sys
from lmref.data.clean import deduplicate
from lmref.data.sources import Document
rng = random.Random(0)
vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
         for _ in range(20000)]
text = " ".join(rng.choice(vocab) for _ in range(400_000))  # one line of varied words
small = Document("a short document about files, paths and the modes they open in", "small")
deduplicate([small])  # imports datasketch and numpy before the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept, stats = deduplicate([small, Document(text, "huge")])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mb": (after - before) / 1024, "chars": len(text), "kept": len(kept)}))
"""


def test_near_dedup_memory_per_document_is_bounded():
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", HUGE_LINE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout)
    assert measured["chars"] > 2_000_000 and measured["kept"] == 2
    # Unbounded, datasketch holds 128 hashes x 400k shingles (400 MB) several times over.
    assert measured["grew_mb"] < 150, measured
