"""Model integrity before serving: a folder is served only when it matches its sha256 manifest.

``lmref.core.manifest`` writes ``manifest.json`` with every folder lmref saves; here the server
checks a model's folder against it before loading a byte of it, and refuses the model (an
``IntegrityError`` naming the file: changed, missing, added) when it does not match. A PEFT
adapter's local base folder is checked too: it is half of what is served.

A folder without a manifest, or a Hugging Face hub id, is refused as well unless the spec says
``allow_unmanifested``; then it is served with a warning. A hub id counts as unmanifested: the
hub's cache is keyed by a revision that can move (a branch), and nothing records which files were
evaluated and released, so there is nothing to verify against. Download it into a folder and
``python -m lmref.core.manifest write FOLDER`` to serve it verified.

The check runs in the engine's loading thread (``lmref.serving.loader.load_spec``): a refused
model's error shows on ``/ready``, as a 503 ``model_load_failed``, and ends ``python -m
lmref.serve`` with exit 1. A folder changed after the check and before the load is not caught.

Usage::

    from lmref.serving.integrity import IntegrityError, check_model

    warnings = check_model("artifacts/base")                 # [] or IntegrityError
    check_model("HuggingFaceTB/SmolLM2-135M", allow_unmanifested=True)   # ['... unverified']
"""

from __future__ import annotations

import json
from pathlib import Path

from lmref.core.manifest import has_manifest, verify_manifest
from lmref.models.loading import resolve_model

ALLOW_HINT = "allow_unmanifested (--allow-unmanifested) serves it unverified"


class IntegrityError(ValueError):
    """A model the server refuses: the message names the folder or file and why."""


def _folders(path: str) -> list[str]:
    """What a served model reads: the path, and a PEFT adapter's base (a folder or hub id)."""
    found = [path]
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None  # the loader says what is wrong with it
        if isinstance(base, str) and base:
            found.append(base)
    return found


def check_model(path: str, allow_unmanifested: bool = False, hashes: bool = True) -> list[str]:
    """Raise ``IntegrityError`` unless every folder ``path`` serves from matches its manifest;
    with ``allow_unmanifested``, one without a manifest (or a hub id) passes and the list returned
    says so (a warning each). ``hashes=False``: names and sizes only (a quick look at start)."""
    warnings = []
    for source in _folders(resolve_model(path)):  # a course name: its folder (converted once)
        if not Path(source).is_dir() or not has_manifest(source):
            what = "is not a local folder (a hub id?)" if not Path(source).is_dir() else None
            what = what or "has no manifest.json"
            if not allow_unmanifested:
                raise IntegrityError(
                    f"{source} {what}: refusing to serve a model that cannot be verified; "
                    f"write one with `python -m lmref.core.manifest write FOLDER`, or "
                    f"{ALLOW_HINT}"
                )
            warnings.append(f"serving {source} unverified: it {what}")
            continue
        reason = verify_manifest(source, hashes=hashes)
        if reason is not None:
            raise IntegrityError(f"refusing to serve {source}: {reason}")
    return warnings
