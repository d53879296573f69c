"""Environment report: library versions, device and precision support — paste it into bug reports.

Usage::

    python -m lmref.lab.env            # or: make env
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGES = [
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "tokenizers",
    "peft",
    "bitsandbytes",
    "safetensors",
    "flask",
    "nbval",
    "lmref",
]


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC", "Intel(R) Xeon(R) ..."), for reports and benchmarks:
    speeds are only comparable on the same model, and the course's machines vary."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_report() -> dict:
    import torch

    from lmref.core.device import select_precision

    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for name in PACKAGES:
        try:
            report[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            report[name] = "not installed"
    report["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name(0)
        report["cuda_version"] = torch.version.cuda
        report["bf16"] = torch.cuda.is_bf16_supported()
        report["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        report["device"] = f"cpu ({cpu_model()}, {os.cpu_count()} cores)"
        report["bf16"] = "autocast only (fp32 is the default on CPU)"
    report["default_precision"] = select_precision()  # the policy every module uses
    report["hf_hub_offline"] = os.environ.get("HF_HUB_OFFLINE", "0")
    return report


def main() -> None:
    for key, value in environment_report().items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
