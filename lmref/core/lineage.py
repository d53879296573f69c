"""Lineage of a trained model: which data, which recipe, which parent model, which code.

A tracked run records these four so that a model in a registry can be traced back (and
rebuilt): ``lineage(...)`` returns them as one flat ``{name: text}`` dict whose keys are MLflow
tag names (``lmref.data_fingerprint``, ``lmref.parent_model``, ``mlflow.source.git.commit``
...), which ``lmref.core.tracking`` logs on every run.

- the data: ``data_fingerprint`` hashes the token ids themselves (a ``datasets.Dataset`` or a
  list of rows), or a folder's ``manifest.json`` (or, without one, the sha256 of every file);
- the recipe: the run's full config, as JSON (its sha256 here; the config itself goes to the
  run as params and a ``recipe.json`` artifact);
- the parent model: its path or hub id and the sha256 of its ``manifest.json`` when it has one
  (``lmref.core.manifest``: the manifest pins every file of the folder);
- the code: the git commit of the working tree holding lmref, whether it had uncommitted
  changes, and lmref's version.

Usage::

    from lmref.core.lineage import data_fingerprint, lineage

    tags = lineage(data=corpus["train"], recipe=asdict(config), parent_model="artifacts/base")
    tags["lmref.data_fingerprint"] == data_fingerprint(corpus["train"])   # True
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from lmref.core.hashing import sha256_of
from lmref.core.manifest import MANIFEST, manifest_files

ROWS_PER_BATCH = 4096  # rows hashed at once: memory stays flat on a large data set
GIT_TIMEOUT = 10.0


def data_fingerprint(data, column: str = "input_ids") -> str:
    """Hex sha256 identifying training data: a folder (its manifest's sha256, else the sha256 of
    a manifest computed now), a ``datasets.Dataset`` (the ``column`` values row by row), or any
    sequence of rows (dicts holding ``column``, or the rows' JSON)."""
    if isinstance(data, str | os.PathLike):
        return _folder_digest(Path(data))
    digest = hashlib.sha256()
    if hasattr(data, "with_format") and column in getattr(data, "column_names", ()):
        import numpy as np
        import pyarrow.compute as pc

        # The logical content (lengths and values as int64), not Arrow's buffers: a select()ed,
        # sliced or re-saved copy of the same rows has the same fingerprint.
        for batch in data.with_format("arrow").iter(batch_size=ROWS_PER_BATCH):
            values = batch.column(column).combine_chunks()
            digest.update(np.asarray(pc.list_value_length(values), dtype=np.int64).tobytes())
            digest.update(np.asarray(values.flatten(), dtype=np.int64).tobytes())
        return digest.hexdigest()
    for row in data:
        value = row[column] if isinstance(row, dict) and column in row else row
        if hasattr(value, "tolist"):  # a tensor or an array
            value = value.tolist()
        digest.update(json.dumps(value, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def model_digest(path: str | os.PathLike) -> str | None:
    """The sha256 of a model folder's ``manifest.json``, or None (no folder, no manifest)."""
    manifest = Path(path) / MANIFEST
    return sha256_of(manifest) if manifest.is_file() else None


def code_version(path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"commit", "dirty", "version"}`` of the git working tree holding ``path`` (default: the
    lmref package); commit ``"unknown"`` outside a git tree or without git."""
    from lmref import __version__

    where = Path(path) if path is not None else Path(__file__).resolve().parent
    # The git command itself rather than GitPython: one call each, and git is what a reader
    # would type to check the answer.
    commit = _git(where, "rev-parse", "HEAD")
    status = _git(where, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit or "unknown",
        "dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
        "version": __version__,
    }


def lineage(
    data=None,
    recipe: dict | None = None,
    parent_model: str | os.PathLike | None = None,
    code_path: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Tags naming a run's data, recipe, parent model and code (see the module docstring).

    ``data``: what ``data_fingerprint`` takes (None: left out); ``recipe``: the run's config as
    a JSON-able dict; ``parent_model``: the folder or hub id trained from (None or "": trained
    from scratch)."""
    code = code_version(code_path)
    tags = {
        "lmref.git_commit": code["commit"],
        "lmref.git_dirty": code["dirty"],
        "lmref.version": code["version"],
        "lmref.parent_model": str(parent_model) if parent_model else "none (from scratch)",
    }
    if code["commit"] != "unknown":
        tags["mlflow.source.git.commit"] = code["commit"]  # the MLflow UI shows this one
    if parent_model and Path(parent_model).is_dir():
        tags["lmref.parent_model"] = str(Path(parent_model).resolve())
        tags["lmref.parent_manifest_sha256"] = model_digest(parent_model) or "none"
    if data is not None:
        tags["lmref.data_fingerprint"] = data_fingerprint(data)
    if recipe is not None:
        text = json.dumps(recipe, sort_keys=True, default=str)
        tags["lmref.recipe_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return tags


def _folder_digest(folder: Path) -> str:
    if not folder.is_dir():
        raise FileNotFoundError(f"no data folder at {folder}")
    digest = model_digest(folder)
    if digest is not None:
        return digest
    text = json.dumps({"files": manifest_files(folder)}, indent=1)
    return hashlib.sha256(text.encode()).hexdigest()


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(where), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
