"""``python -m lmref.serve``: the model server as one process under waitress (see lmref.serving).

``--model NAME=PATH`` takes a folder, a hub id or a course name from ``lmref.modeling``
(``smollm2-135m-instruct``: converted from its packaged GGUF on first use). Without ``--model``
it serves that real chat model as ``smollm2``. SIGTERM: new requests get 503, in-flight ones
finish (``--drain-timeout``).

Usage::

    python -m lmref.serve --port 8000 --torch-threads 2          # smollm2-135m-instruct
    LMREF_API_KEYS=sk-local python -m lmref.serve --model v1=artifacts/base \\
        --model v2=artifacts/full-ft --alias prod=v1:0.9,v2:0.1
"""

from __future__ import annotations

import sys

from lmref.modeling import resolve_model
from lmref.serving import main

DEFAULT_MODEL = "smollm2=smollm2-135m-instruct"


def resolve_model_args(argv: list[str]) -> list[str]:
    """Each ``--model NAME=PATH`` with a course name as PATH gets the converted folder instead."""
    argv = list(argv) if "--model" in argv else ["--model", DEFAULT_MODEL, *argv]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--model" and "=" in argv[i + 1]:
            name, path = argv[i + 1].split("=", 1)
            argv[i + 1] = f"{name}={resolve_model(path)}"
    return argv


if __name__ == "__main__":
    sys.exit(main(resolve_model_args(sys.argv[1:])))
