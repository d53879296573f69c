"""Crash-safe training checkpoints: atomic folders, a manifest written last, verified resumes.

A checkpoint is a folder ``checkpoint-<step>/`` holding the trainable weights (safetensors), the
optimizer, scheduler, gradient-scaler and RNG states (``training_state.pt``, loaded with
``weights_only=True``), the trainer's counters (``trainer_state.json``), optionally the run's
settings (``run_config.json``) and, written last, ``manifest.json``: the size and sha256 of every
other file. It is written into a temp folder and renamed in one step, so a crash mid-write never
leaves a half checkpoint under the real name; a folder damaged afterwards (a torn copy, a full
disk, a truncated file) fails ``verify_checkpoint``, and ``latest_checkpoint`` then falls back to
the newest one that verifies, warning which it skipped and why. ``lmref.training.loop.train`` saves
and resumes through this module.

Usage::

    from lmref.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint

    path = save_checkpoint("artifacts/run", model, optimizer, scheduler, scaler,
                           {"step": 100, "micro_step": 200}, keep=2)
    newest = latest_checkpoint("artifacts/run")     # skips (and warns about) damaged ones
    state = load_checkpoint(newest, model, optimizer, scheduler, scaler)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder or file and why."""


MANIFEST = "manifest.json"  # written last: {"files": {name: {"bytes": n, "sha256": hex}}}
RUN_CONFIG = "run_config.json"  # the settings of the run that wrote it (``run_config``)


def save_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    state: dict,
    keep: int = 2,
    is_main: bool = True,
    run_config: dict | None = None,
) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` atomically: a temp folder, then one rename.

    A crash mid-write leaves a ``.tmp-*`` folder that resume ignores, so the previous checkpoint
    stays the latest loadable one. ``manifest.json`` (sizes and sha256 of the other files) is
    written last, so a folder damaged later (a torn copy, a full disk) is caught on resume.
    """
    final = Path(out_dir) / f"checkpoint-{state['step']:07d}"
    world = _rank_and_world()[1]
    torch_rng = [torch.get_rng_state()] * world
    if world > 1:  # rank 0 writes every rank's generator state (only rank 0 writes files)
        dist.all_gather_object(torch_rng, torch.get_rng_state())
    if is_main:
        tmp = Path(out_dir) / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Trainable tensors only: frozen ones (a LoRA base) never change, so reload them as before.
        weights = {
            n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(weights, tmp / "model.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.stack(torch_rng),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "training_state.pt",
        )
        np_state = np.random.get_state()
        (tmp / "trainer_state.json").write_text(
            json.dumps(
                {
                    **state,
                    "python_rng": _jsonable(random.getstate()),
                    "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                }
            )
        )
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=1))
        files = {
            f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())
        }
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(Path(out_dir).glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank races ahead and reads a half-written checkpoint
    return final


def verify_checkpoint(path: Path | str) -> str | None:
    """``None`` when every file matches ``manifest.json``, else why not (naming the file)."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing (the write did not finish, or it predates manifests)"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{path / MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != expected["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(f) != expected["sha256"]:
            return f"{f} does not match its sha256 in the manifest"
    return None


def latest_checkpoint(out_dir: Path | str, warn: bool = True) -> Path | None:
    """The newest ``checkpoint-*`` folder that verifies (see ``verify_checkpoint``).

    Newer ones that fail are skipped with a warning that names the file and why; temp folders
    of a crashed write are never candidates. Raises ``CheckpointError`` when checkpoints exist but
    none verifies (starting afresh would silently throw the run away).
    """
    found = sorted(Path(out_dir).glob("checkpoint-*"), reverse=True)
    skipped = []
    for candidate in found:
        reason = verify_checkpoint(candidate)
        if reason is None:
            break
        skipped.append(f"skipped checkpoint {candidate.name}: {reason}")
    else:
        candidate = None
    if found and candidate is None:
        raise CheckpointError(
            f"no checkpoint in {out_dir} verifies: "
            + "; ".join(skipped)
            + ". Move them away to start afresh; one written before manifests "
            "existed loads when its path is given as resume_from_checkpoint."
        )
    if warn:
        for message in skipped:
            warnings.warn(message, stacklevel=2)
    return candidate


def read_run_config(path: Path | str) -> dict | None:
    """The ``run_config`` that ``save_checkpoint`` recorded (None when there was none)."""
    f = Path(path) / RUN_CONFIG
    return json.loads(f.read_text()) if f.is_file() else None


def load_checkpoint(
    path: Path | str, model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None
) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns the trainer state (step, data position).

    A file that cannot be read raises ``CheckpointError`` naming it (not a bare library error).
    """
    path = Path(path)
    weights = _read(path / "model.safetensors", load_file)
    weights = {_strip_wrappers(k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(n in missing for n, p in model.named_parameters() if p.requires_grad):
        raise ValueError(
            f"checkpoint {path} does not match the model "
            f"(unexpected: {unexpected[:3]}, trainable missing)"
        )
    training = _read(
        path / "training_state.pt", lambda f: torch.load(f, weights_only=True, map_location="cpu")
    )
    if optimizer is not None:
        optimizer.load_state_dict(training["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(training["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(training["scaler"])
    # One generator state per rank (a resume at another world size is not exact anyway: the
    # data shards change; extra ranks then reuse saved states).
    rng = training["torch_rng"]
    torch.set_rng_state(rng[_rank_and_world()[0] % len(rng)].clone())
    if training["cuda_rng"]:
        torch.cuda.set_rng_state_all(training["cuda_rng"])
    state = _read(path / "trainer_state.json", lambda f: json.loads(f.read_text()))
    random.setstate(_tupled(state.pop("python_rng")))
    name, keys, *rest = state.pop("numpy_rng")
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return state


def _read(path: Path, reader: Callable):
    try:
        return reader(path)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _strip_wrappers(name: str) -> str:
    """Names saved from a compiled or DDP-wrapped model elsewhere: drop those prefixes."""
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
