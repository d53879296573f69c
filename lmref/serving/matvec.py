"""A few rows against a weight matrix at the memory's speed: the matvec of few-stream decode.

Decoding one stream multiplies one row by every weight matrix of the model, reading each weight
once: the step takes as long as streaming the weights does. Measured on a 2-core AMD EPYC
(AVX-512), one row against SmolLM2-135M's 121 decode matrices read cold, each kernel against a
torch sum and oneDNN in the same run: oneDNN's packed matmul (``lmref.serving.packed_linear``,
the fastest torch reaches here) reads them at 72-79% of the speed a torch sum reads the same
bytes; MKL's GEMM at about a third; inductor's compiled multiply-reduce as fast as oneDNN (38.9
against 39.8 GB/s) and its GEMM template slower; numpy's OpenBLAS faster, but its thread pool
fights torch's in the step. So this is the project's hand-written kernel (``matvec.cpp``, AVX-512
or AVX2, its vectors in ``simd.h``; the attention side in ``attend.cpp``): each thread streams
its block of rows front to back, four rows of W sharing each load of x, asking for W 9 KB ahead
of its reads, on torch's own OpenMP pool. It read at
44.9 GB/s against oneDNN's 37.5 and the sum's 47.2; the one-row decode step (``SlotBatch``,
interleaved in one process) took 11.1-11.4 ms against 14.2-14.3; served single-stream, 74.4
against 66.5 tokens/s, as fast as llama.cpp on the F32 GGUF (74.3;
``benchmarks/results/serving_peer-cpu-avx512-matvec.json``).

Two uses, both in ``lmref.serving.fused_llama``'s decode step:

- ``FewRowsLinear`` (fp32) holds a matrix both ways: plain for the kernel (up to ``KERNEL_ROWS``
  rows) and packed for oneDNN (more rows, where its blocked GEMM is as fast or faster). The
  plain tensors cost memory: 424 MB for SmolLM2-135M (q/k/v and gate/up stacked, 278 MB; o and
  down, which ``pack_linears`` would otherwise free, 146 MB; the output layer is the
  embedding's own tensor); the process's resident memory grew by 220 MB.
- ``Int8Linear`` (``--decode-weights int8``): int8 weights, a scale per output row; each row
  of x rounded to int16 with its own scale, the products summed exactly in int32 (AVX512-VNNI's
  one instruction where the CPU has it). Every row count goes through the kernel, and a row's
  result does not depend on its batch. Served single-stream on the AVX-512 EPYC: 159.2 tokens/s
  against llama.cpp's 151.2 on its Q4_1 file (``serving_peer-cpu-avx512-int8.json``).

Both can take the RMSNorm before them (``after_norm``), and the module has the step's rotary and
cache writes (``rope_store``) and attention (``attend``, any row count): once the matmuls stream
at the memory's speed, a one-row step of 30 layers is as much the cost of its ~600 small torch
calls (6.7 us a norm, 7-12 us an attention matmul) as of its weights. With them, a one-row int8
step took 3.35 ms against 4.6 (interleaved in one process). With the norm and int16 rounding in
vectors on both threads and ``attend`` at every row count (its products kept in registers, its
exp in vectors), int8 steps of 16 and 64 rows took 31.3 and 104.6 ms against 33.9 and 123.9,
fp32 ones 64.8 and 143.0 against 68.1 and 148.9 (median of 3 interleaved processes, Intel Xeon).

Built once per environment and vector width with ``torch.utils.cpp_extension`` (g++ and ninja,
from Debian in ``make setup``, which builds it) into ``<venv>/lmref-kernels/`` (torch's own
extension folder where the environment is not writable). Where it cannot be built or the CPU
has neither AVX-512 nor AVX2, or with ``LMREF_MATVEC=0``, ``matvec_kernel()`` is None: fp32
decode runs oneDNN for every row count, as before, and int8 torch's own kernel (a failed build
is logged once).

Usage::

    from lmref.serving.matvec import FewRowsLinear, Int8Linear, matvec_kernel

    kernel = matvec_kernel()                    # None: not available here (logged)
    y = kernel.matvec(x, weight)                # x (rows, in), weight (out, in): fp32
    y = kernel.matvec(x, weight, residual)      # residual + x @ weight.T in one pass
    y = kernel.matvec(x, int8, None, scale)     # int8 (out, in), scale (out,): fp32
    linear = FewRowsLinear(weight, kernel)      # up to 8 rows: the kernel; more: oneDNN
    linear = Int8Linear(weight, kernel)         # quantizes weight; any rows: the kernel
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
SOURCES = [Path(__file__).with_name(name) for name in ("matvec.cpp", "attend.cpp")]  # simd.h too
AVX512 = ["-mavx512f", "-mavx512bw", "-mfma"]
FLAGS = {  # vector width -> compiler flags (simd.h's #if); VNNI: int8 sums in one instruction
    "avx512-vnni": [*AVX512, "-mavx512vnni"],
    "avx512": AVX512,
    "avx2": ["-mavx2", "-mfma"],
}
# fp32 steps of up to 8 rows are faster through the kernel than through oneDNN, of 16 and more
# not (SmolLM2-135M, SlotBatch steps, the two interleaved, three rounds, AVX-512 EPYC; ms):
# 2 rows 13.6-17.0 against 14.5-17.4, 4: 14.3-17.9 / 16.1-17.6, 8: 17.4-20.2 / 20.1-22.4,
# 16: 24.7-30.2 / 25.3-28.3, 64: 69.9-75.2 / 69.3-77.2.
KERNEL_ROWS = 8
_built: dict[str, object] = {}  # vector width -> the loaded module, or None (could not build)
_lock = threading.Lock()


def vector_width() -> str | None:
    """ "avx512-vnni", "avx512", "avx2", or None (another CPU): what torch's own kernels found
    on this CPU, and whether it has AVX512-VNNI (Linux's /proc/cpuinfo; torch does not say)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    width = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    if width == "avx512" and "avx512_vnni" in _cpu_flags():
        return "avx512-vnni"
    return width


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info
                         if line.startswith("flags")), set())  # fmt: skip
    except OSError:
        return set()


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

    # One per width: a home shared by several machine kinds.
    name = f"lmref_matvec_{width.replace('-', '_')}"
    # In the environment's own folder when it is writable (a venv): built against its torch, and
    # not rebuilt in turn by another checkout, as torch's shared default folder would be.
    folder = Path(sys.prefix, "lmref-kernels", name) if os.access(sys.prefix, os.W_OK) else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        module = load(
            name=name,
            sources=[str(source) for source in SOURCES],
            build_directory=None if folder is None else str(folder),
            # -fopenmp: at::parallel_for is inline, and without it runs on one thread. The
            # library it links is the libgomp torch has loaded already (the same soname).
            extra_cflags=["-O3", "-fopenmp", *FLAGS[width]],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler or ninja, a failed build: oneDNN serves every row
        log.warning("decode kernels unavailable, decode uses oneDNN and torch's calls: %s", err)
        return None
    log.info("decode kernels (%s) ready in %.1f s", width, time.perf_counter() - started)
    return module


class FewRowsLinear:
    """``x @ W.T`` in fp32: up to ``KERNEL_ROWS`` rows through the kernel, more through oneDNN's
    packed GEMM."""

    def __init__(self, weight: torch.Tensor, kernel):
        self.weight = weight.detach().contiguous()  # a model's own tensor is not copied
        self.out_features, self.in_features = self.weight.shape
        # oneDNN sees 9+ rows only: PackedLinear's default layout, the one for 16, is the faster
        # for them on every CPU measured (fused_llama.largest_matrices_layout has the numbers).
        self.packed = PackedLinear(self.weight, None)
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= KERNEL_ROWS:
            return self.kernel.matvec(x.contiguous(), self.weight)
        return self.packed(x)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one call, as ``PackedLinear.add_to``."""
        if x.shape[0] <= KERNEL_ROWS:
            return self.kernel.matvec(x.contiguous(), self.weight, residual.contiguous())
        return self.packed.add_to(residual, x)

    def after_norm(self, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
        """``self(torch.rms_norm(x, ..., gain, eps))``: the kernel's in one call."""
        if x.shape[0] <= KERNEL_ROWS:
            return self.kernel.matvec(x.contiguous(), self.weight, None, None, gain, eps)
        return self.packed(torch.rms_norm(x, (self.in_features,), gain, eps))


class Int8Linear:
    """``x @ W.T`` from W stored in int8, one scale per output row (max |w| / 127), for any
    number of rows, through the kernel: each row of x is rounded to int16 with its own scale
    (max |x| / 32767) and the products are summed exactly in int32, so a row's result does not
    depend on its batch. A quarter of fp32's bytes, and a third of the vector instructions a
    weight would cost widened to fp32 (which was compute-bound at 5.0 ms for SmolLM2's int8
    matrices where this takes 2.4-2.5, AVX-512 EPYC)."""

    def __init__(self, weight: torch.Tensor, kernel):
        weight = weight.detach().float()
        self.scale = (weight.abs().amax(1) / 127).clamp(min=1e-12).contiguous()
        self.weight = (weight / self.scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.out_features, self.in_features = self.weight.shape
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.matvec(x.contiguous(), self.weight, None, self.scale)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one call."""
        return self.kernel.matvec(x.contiguous(), self.weight, residual.contiguous(), self.scale)

    def after_norm(self, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
        """``self(torch.rms_norm(x, ..., gain, eps))`` in one call."""
        return self.kernel.matvec(x.contiguous(), self.weight, None, self.scale, gain, eps)


if __name__ == "__main__":  # `make setup`: build it now, not at a server's first start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernel = matvec_kernel()
    print(f"decode kernels for {vector_width()}: {'built' if kernel else 'not used'}")
