"""One device/dtype policy (lmref.core.device), used by every module that picks a dtype."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from lmref.core.device import compute_dtype, resolve_device, select_precision
from lmref.models.loading import resolve_dtype
from lmref.models.quantized import quantization_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpus_with_and_without_bf16_get_the_same_answer_everywhere(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_device("auto").type == "cuda"
    assert compute_dtype("cuda") == expected
    assert select_precision("cuda") == {torch.bfloat16: "bf16", torch.float16: "fp16"}[expected]
    # The one loader (used by LoRA, QLoRA, compression and serving) asks the policy; so does the
    # compute dtype of a quantized load (compression.load_bnb once picked bf16 on every GPU).
    assert resolve_dtype("auto", resolve_device("auto")) == expected
    assert (
        quantization_config("nf4", resolve_dtype("auto", "cuda")).bnb_4bit_compute_dtype == expected
    )


def test_cpu_is_fp32_and_explicit_requests_win():
    assert compute_dtype("cpu") == torch.float32 and select_precision("cpu") == "fp32"
    assert select_precision("cpu", "bf16") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        select_precision("cpu", "fp8")


def test_no_module_decides_precision_on_its_own():
    """Only lmref/core/device.py may ask the hardware which float types it supports."""
    offenders = []
    paths = sorted((ROOT / "lmref").rglob("*.py"))
    assert len(paths) > 30 and ROOT / "lmref" / "models" / "loading.py" in paths  # every stage
    for path in paths:
        # env.py reports the hardware, decides nothing
        if path.relative_to(ROOT).as_posix() in ("lmref/core/device.py", "lmref/lab/env.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "is_bf16_supported":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
