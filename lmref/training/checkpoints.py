"""Crash-safe training checkpoints: atomic folders, a manifest written last, verified resumes.

A checkpoint is a folder ``checkpoint-<step>/`` holding the trainable weights (safetensors), the
optimizer, scheduler, gradient-scaler and RNG states (``training_state.pt``, loaded with
``weights_only=True``), the trainer's counters (``trainer_state.json``), optionally the run's
settings (``run_config.json``) and, written last, ``manifest.json``: the size and sha256 of every
other file. A sharded run (FSDP, TP, PP: ``sharded=True``) writes the weights and optimizer as a
``torch.distributed.checkpoint`` folder ``sharded/`` instead, every rank its shards
(``lmref.training.sharded_state``), and the manifest covers those files too; either kind resumes
at any world size and parallelism. It is written into a temp folder and renamed in one step, so a crash mid-write never
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

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

# The manifest is lmref.core.manifest's (one format for every folder); MANIFEST and
# write_manifest stay importable from here for the callers that know them by this module.
from lmref.core.manifest import MANIFEST as MANIFEST
from lmref.core.manifest import verify_manifest, write_manifest
from lmref.core.ranks import rank_and_world


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder or file and why."""


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
    sharded: bool = False,
) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` atomically: a temp folder, then one rename.

    A crash mid-write leaves a ``.tmp-*`` folder that resume ignores, so the previous checkpoint
    stays the latest loadable one. ``manifest.json`` (sizes and sha256 of the other files) is
    written last, so a folder damaged later (a torn copy, a full disk) is caught on resume.
    ``sharded``: every rank calls this and writes its shards into the same temp folder.
    """
    final = Path(out_dir) / f"checkpoint-{state['step']:07d}"
    world = rank_and_world()[1]
    torch_rng = [torch.get_rng_state()] * world
    if world > 1:  # rank 0 writes every rank's generator state (only rank 0 writes files)
        dist.all_gather_object(torch_rng, torch.get_rng_state())
    if sharded:
        from lmref.training.sharded_state import save_sharded

        tmp = _fresh_tmp(final) if is_main else _tmp_of(final)
        _barrier()  # the temp folder exists, empty, before any rank writes into it
        save_sharded(tmp, model, optimizer)  # collective; rank 0 writes the metadata last
    if is_main:
        with atomic_folder(final, manifest=True, tmp=tmp if sharded else None) as tmp:
            if not sharded:
                # Trainable tensors only: frozen ones (a LoRA base) never change, so reload them as before.
                weights = {
                    n: p.detach().cpu().contiguous()
                    for n, p in model.named_parameters()
                    if p.requires_grad
                }
                save_file(weights, tmp / "model.safetensors")
            torch.save(
                {
                    **({} if sharded else {"optimizer": optimizer.state_dict()}),
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
        for old in sorted(Path(out_dir).glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()  # no rank races ahead and reads a half-written checkpoint
    return final


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _tmp_of(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}")


def _fresh_tmp(path: Path) -> Path:
    tmp = _tmp_of(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def atomic_folder(
    path: Path | str, manifest: bool = False, tmp: Path | None = None
) -> Iterator[Path]:
    """A folder that appears whole or not at all. Yields an empty temp sibling (``.tmp-<name>``,
    which resume ignores) to write into (or ``tmp``, made by ``_fresh_tmp`` and filled by other
    ranks too); when the block ends without an error, writes its manifest last where asked
    (``write_manifest``) and renames it over ``path``. After an error the temp folder stays, as
    a crash would leave it, and ``path`` is untouched."""
    path = Path(path)
    tmp = tmp or _fresh_tmp(path)
    yield tmp
    if manifest:
        write_manifest(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def verify_checkpoint(path: Path | str) -> str | None:
    """``None`` when the folder matches its ``manifest.json`` (``lmref.core.manifest``: no file
    missing, added or changed), else why not, naming the file."""
    return verify_manifest(path)


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
    path: Path | str,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    sharded: bool = False,
) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns the trainer state (step, data position).

    ``sharded``: ``model`` is sharded (FSDP, TP, PP) and every rank calls this. A sharded
    checkpoint loads into any model (DCP reshards it); a full one into a sharded model through
    ``set_state_dict``. A file that cannot be read raises ``CheckpointError`` naming it.
    """
    from lmref.training import sharded_state

    path = Path(path)
    training = _read(
        path / "training_state.pt", lambda f: torch.load(f, weights_only=True, map_location="cpu")
    )
    if (path / sharded_state.SHARDED).is_dir():
        _read(
            path / sharded_state.SHARDED, lambda f: sharded_state.load_sharded(f, model, optimizer)
        )
    else:
        weights = _read(path / "model.safetensors", load_file)
        if sharded:
            sharded_state.load_full(model, optimizer, weights, training["optimizer"])
        else:
            check_weights_match(path, weights, model)
            model.load_state_dict(_match_names(weights, model.state_dict()), strict=False)
            if optimizer is not None:
                optimizer.load_state_dict(training["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(training["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(training["scaler"])
    # One generator state per rank (a resume at another world size is not exact anyway: the
    # data shards change; extra ranks then reuse saved states).
    rng = training["torch_rng"]
    torch.set_rng_state(rng[rank_and_world()[0] % len(rng)].clone())
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


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's, in front of a name


def _strip_wrappers(name: str) -> str:
    """A name saved from a compiled or DDP-wrapped model elsewhere, without the wrappers'
    leading prefixes (any number, in any order). Only leading ones: a submodule that is itself
    called ``module`` or ``original_module`` keeps its name."""
    while name != (shorter := _strip_one(name)):
        name = shorter
    return name


def _match_names(weights: dict, expected) -> dict:
    """Saved names as the model names them: leading wrapper prefixes go one at a time, until
    the name is one the model has (its own submodule may be called ``module``)."""
    matched = {}
    for name, value in weights.items():
        key = name
        while key not in expected and key != (shorter := _strip_one(key)):
            key = shorter
        matched[key if key in expected else _strip_wrappers(name)] = value
    return matched


def _strip_one(name: str) -> str:
    prefix = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), "")
    return name.removeprefix(prefix)


def check_weights_match(path: Path | str, weights: dict, model: torch.nn.Module) -> None:
    """Raise ``CheckpointError`` when saved ``weights`` cannot resume ``model``: names the model
    lacks, trainable parameters the checkpoint lacks, and shapes that differ (a few of each)."""
    expected = model.state_dict()
    weights = _match_names(weights, expected)
    unexpected = sorted(k for k in weights if k not in expected)
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in weights)
    shapes = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in sorted(weights.items())
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (
            ("not in the model", unexpected),
            ("trainable but not in the checkpoint", missing),
            ("other shape", shapes),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: "
            + "; ".join(problems)
            + ". Resume with the model (and LoRA settings) that wrote it."
        )


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def save_model_folder(model: torch.nn.Module | None, folder: Path, is_main: bool = True) -> None:
    """``model`` in Hugging Face format with its manifest, whole or not at all (``atomic_folder``);
    rank 0 alone writes (``model`` may be None on the others: ``ParallelPlan.full_model``)."""
    if is_main:
        with atomic_folder(folder, manifest=True) as tmp:
            model.save_pretrained(tmp)
