"""Sharded model and optimizer state with ``torch.distributed.checkpoint`` (DCP): every rank
writes its own shards, and any world size or parallelism reads them back (DCP reshards).

``lmref.training.checkpoints`` calls this for the weights and optimizer of a sharded run (FSDP,
TP, PP) and keeps its own conventions around it (atomic folder, manifest last, verified resume,
run settings, data position). The state goes through ``get_state_dict`` / ``set_state_dict``
(``torch.distributed.checkpoint.state_dict``), which name every tensor by its fully qualified
parameter name whatever wraps it; the optimizer state is flattened to one key a tensor
(``state.<param>.exp_avg``), so PP stages, each with its own optimizer, write disjoint keys.

Usage::

    from lmref.training.sharded_state import load_full, load_sharded, save_sharded

    save_sharded(folder, model, optimizer)        # every rank: folder/sharded/
    load_sharded(folder / "sharded", model, optimizer)   # at any world size
    load_full(model, optimizer, weights, optimizer_state_dict)   # a 1-process checkpoint, sharded
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

SHARDED = "sharded"  # the DCP folder inside a checkpoint
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _states(model: torch.nn.Module, optimizer) -> dict:
    # get_state_dict first runs a zero step when the optimizer has no state yet, so a resume
    # right at the start has AdamW's moments to load into.
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(folder: Path | str, model: torch.nn.Module, optimizer) -> None:
    """Write ``folder/sharded/`` (collective: every rank calls it, rank 0 writes the metadata)."""
    dcp.save(_states(model, optimizer), checkpoint_id=str(Path(folder) / SHARDED))


def load_sharded(path: Path | str, model: torch.nn.Module, optimizer=None) -> None:
    """Load a DCP folder into ``model`` (and ``optimizer``), resharded to their current layout."""
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model, options=OPTIONS)}
    else:
        state = _states(model, optimizer)
    with warnings.catch_warnings():
        # Without a process group (a sharded run resumed by one process) torch 2.13 warns that it
        # "assumes the intent is to load in a single process", even when told so (no_dist=True):
        # that is the intent here.
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=OPTIONS)
    else:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=OPTIONS,
        )


def load_full(model: torch.nn.Module, optimizer, weights: dict, optimizer_state: dict) -> None:
    """A single-process checkpoint (full weights, ``optimizer.state_dict()``) into a sharded
    model: every rank passes the full tensors and keeps its shards.

    ``optimizer.state_dict()`` keys parameters by position; the optimizer of the sharded model
    was built by the same rule (``lmref.training.loop.make_optimizer``) over the same parameter
    names, so position i is the same parameter in both.
    """
    names = {id(p): n for n, p in model.named_parameters()}  # a tied one: its first name
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = sum(len(g["params"]) for g in optimizer_state["param_groups"])
    if saved != len(order):  # a pipeline stage holds a part: positions would name other tensors
        raise ValueError(
            f"the checkpoint's optimizer holds {saved} parameters, this rank's {len(order)}: a "
            "single-process checkpoint loads into FSDP or TP, not into a pipeline stage"
        )
    by_name = {
        "state": {order[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]}
            for g in optimizer_state["param_groups"]
        ],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=by_name,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
