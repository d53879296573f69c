"""One row against a weight matrix at the memory's speed: the fp32 matvec of single-stream decode.

Decoding one stream multiplies one row by every weight matrix of the model, reading each weight
once: the step takes as long as streaming the weights does. Measured on a 2-core AMD EPYC
(AVX-512), one row against SmolLM2-135M's 121 decode matrices read cold, each kernel against a
torch sum and oneDNN in the same run: oneDNN's packed matmul (``lmref.serving.packed_linear``, the fastest torch reaches
here) reads them at 72-79% of the speed a torch sum reads the same bytes; MKL's GEMM at about
a third; inductor's compiled multiply-reduce as fast as oneDNN (38.9 against 39.8 GB/s) and its
GEMM template slower; numpy's OpenBLAS faster, but its thread pool fights torch's in the step.
So this is the project's one hand-written kernel (``matvec.cpp``, about 40 lines of AVX-512 or
AVX2): each thread streams its block of rows front to back, four rows sharing each load of the
row vector, on torch's own OpenMP pool. It read at 44.9 GB/s against oneDNN's 37.5 and the
sum's 47.2; the one-row decode step (``SlotBatch``, interleaved in one process) took 11.1-11.4
ms against 14.2-14.3; served single-stream, 74.4 against 66.5 tokens/s, as fast as llama.cpp on
the F32 GGUF (74.3; ``benchmarks/results/serving_peer-cpu-avx512-matvec.json``).

``OneRowLinear`` holds a matrix both ways: plain for this kernel (one row) and packed for oneDNN
(more rows, where its blocked GEMM wins: steps of 16, 32 and 64 rows are unchanged). The plain
tensors cost memory: 424 MB for SmolLM2-135M (q/k/v and gate/up stacked, 278 MB; o and down,
which ``pack_linears`` would otherwise free, 146 MB; the output layer is the embedding's own
tensor); the process's resident memory grew by 220 MB.

Built once per environment and vector width with ``torch.utils.cpp_extension`` (g++ and ninja,
from Debian in ``make setup``, which builds it) into ``<venv>/lmref-kernels/`` (torch's own
extension folder where the environment is not writable). Where it cannot be
built or the CPU has neither AVX-512 nor AVX2, or with ``LMREF_MATVEC=0``, ``matvec_kernel()``
is None and decode runs oneDNN for every row count, as before (a failed build is logged once).

Usage::

    from lmref.serving.matvec import OneRowLinear, matvec_kernel

    kernel = matvec_kernel()                    # None: not available here (logged)
    y = kernel.matvec(x, weight)                # x (1, in), weight (out, in): fp32, contiguous
    y = kernel.matvec(x, weight, residual)      # residual + x @ weight.T in one pass
    linear = OneRowLinear(weight, kernel)       # one row: the kernel; more: oneDNN
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from lmref.serving.packed_linear import PackedLinear

log = logging.getLogger("lmref.serving.matvec")
SOURCE = Path(__file__).with_name("matvec.cpp")
FLAGS = {"avx512": ["-mavx512f", "-mfma"], "avx2": ["-mavx2", "-mfma"]}  # matvec.cpp's #if
_built: dict[str, object] = {}  # vector width -> the loaded module, or None (could not build)
_lock = threading.Lock()


def vector_width() -> str | None:
    """ "avx512", "avx2", or None (another CPU): what torch's own kernels found on this CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability)


def matvec_kernel(width: str | None = None):
    """The built kernel for ``width`` (default: this CPU's), or None where it cannot be used
    (its reason logged once). ``LMREF_MATVEC=0`` turns it off."""
    if os.environ.get("LMREF_MATVEC", "1") == "0":
        return None
    width = width or vector_width()
    if width not in FLAGS:
        return None
    with _lock:  # one build per process; torch's lock file keeps processes from building twice
        if width not in _built:
            _built[width] = _build(width)
        return _built[width]


def _build(width: str):
    from torch.utils.cpp_extension import load

    name = f"lmref_matvec_{width}"  # one per width: a home shared by several machine kinds
    # In the environment's own folder when it is writable (a venv): built against its torch, and
    # not rebuilt in turn by another checkout, as torch's shared default folder would be.
    folder = Path(sys.prefix, "lmref-kernels", name) if os.access(sys.prefix, os.W_OK) else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        module = load(
            name=name,
            sources=[str(SOURCE)],
            build_directory=None if folder is None else str(folder),
            # -fopenmp: at::parallel_for is inline, and without it runs on one thread. The
            # library it links is the libgomp torch has loaded already (the same soname).
            extra_cflags=["-O3", "-fopenmp", *FLAGS[width]],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler or ninja, a failed build: oneDNN serves every row
        log.warning("one-row matvec kernel unavailable, decode uses oneDNN: %s", err)
        return None
    log.info("one-row matvec kernel (%s) ready in %.1f s", width, time.perf_counter() - started)
    return module


class OneRowLinear:
    """``x @ W.T``: one row through the matvec kernel, more rows through oneDNN's packed GEMM."""

    def __init__(self, weight: torch.Tensor, kernel):
        self.weight = weight.detach().contiguous()  # a model's own tensor is not copied
        self.out_features, self.in_features = self.weight.shape
        # oneDNN sees 2+ rows only: PackedLinear's default layout, the one for 16, is the faster
        # for them on every CPU measured (fused_llama.largest_matrices_layout has the numbers).
        self.packed = PackedLinear(self.weight, None)
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.kernel.matvec(x.contiguous(), self.weight)
        return self.packed(x)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one call, as ``PackedLinear.add_to``."""
        if x.shape[0] == 1:
            return self.kernel.matvec(x.contiguous(), self.weight, residual.contiguous())
        return self.packed.add_to(residual, x)


if __name__ == "__main__":  # `make setup`: build it now, not at a server's first start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernel = matvec_kernel()
    print(f"one-row matvec kernel for {vector_width()}: {'built' if kernel else 'not used'}")
