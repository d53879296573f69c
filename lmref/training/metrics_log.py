"""What the training loop writes about itself: ``metrics.jsonl`` lines (also sent to the run's
trackers), the FLOPs arithmetic behind its MFU (model FLOPs utilisation) figure, and the run's
lineage (data, recipe, parent model, code) for a tracked run.

``metrics.jsonl`` holds one JSON object a line, each with its ``step``; on resume the lines an
interrupted run logged after its last checkpoint are dropped (``truncate_metrics``), so the file
reads as if the run had never stopped.

Usage::

    from lmref.training.metrics_log import device_peak_flops, flops_per_token, log_record

    mfu = tokens_per_s * flops_per_token(model, dataset) / device_peak_flops(device)
    log_record(out_dir, {"step": 10, "loss": 2.3}, is_main=True, history=history)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from lmref.core.lineage import lineage

METRICS = "metrics.jsonl"

# bf16 dense peak of common accelerators, for MFU (model FLOPs utilisation).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


def flops_per_token(model: torch.nn.Module, dataset) -> float:
    """6 N (forward + backward matmuls) + attention, as in the PaLM paper's appendix B."""
    config = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    seq = len(dataset[0]["input_ids"]) if len(dataset) else 0
    return 6 * n + 12 * layers * hidden * seq


def device_peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of ``device`` when it is a GPU named in ``PEAK_FLOPS``, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def log_record(
    out_dir: Path, record: dict, is_main: bool, history: list[dict], tracker=None
) -> None:
    """Append ``record`` to ``history`` (every rank) and to ``metrics.jsonl`` (rank 0); and to
    ``tracker`` (``lmref.core.tracking.Trackers``, rank 0) at ``record["step"]``."""
    history.append(record)
    if is_main:
        with open(Path(out_dir) / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if tracker is not None:
            tracker.log_metrics(record, record["step"])


def truncate_metrics(path: Path, step: int, is_main: bool) -> None:
    """On resume, drop the lines an interrupted run logged after its last checkpoint."""
    if is_main and path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a line torn by the crash itself
        path.write_text("".join(line + "\n" for line in kept))


def run_lineage(model: torch.nn.Module, dataset, config) -> dict[str, str]:
    """``lmref.core.lineage.lineage`` of a training run (``config``: its ``TrainingConfig``); the
    parent is the folder or hub id the model was loaded from (transformers' ``name_or_path``;
    none for a model built from a config)."""
    parent = getattr(getattr(model, "config", None), "name_or_path", "") or None
    return lineage(data=dataset, recipe=asdict(config), parent_model=parent)
