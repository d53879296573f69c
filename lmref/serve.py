"""``python -m lmref.serve``: the model server as one process under waitress (see lmref.serving).

Without ``--model`` it serves the course's newest model: ``artifacts/full-ft`` if present, else
``artifacts/base``. SIGTERM: new requests get 503, in-flight ones finish (``--drain-timeout``).

Usage::

    python -m lmref.serve --model base=artifacts/base --port 8000 --torch-threads 2
    LMREF_API_KEYS=sk-local python -m lmref.serve --model v1=artifacts/base \\
        --model v2=artifacts/full-ft --alias prod=v1:0.9,v2:0.1
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmref.serving import main


def default_model_args() -> list[str]:
    """``--model NAME=PATH`` for the course's newest artifact, or nothing when none exists."""
    try:
        from lmref.course import ARTIFACTS
    except ImportError:  # course glue not available (module copied alone): the repo default
        ARTIFACTS = Path(os.environ.get("LMREF_ARTIFACTS",
                                        Path(__file__).resolve().parent.parent / "artifacts"))
    for name in ("full-ft", "base"):
        if (Path(ARTIFACTS) / name / "config.json").exists():
            return ["--model", f"{name}={Path(ARTIFACTS) / name}"]
    return []


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--model" not in argv:
        argv = default_model_args() + argv
    sys.exit(main(argv))
