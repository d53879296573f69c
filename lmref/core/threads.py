"""Which thread owns torch's CPU workers: handing them over when another thread runs the model.

torch's CPU kernels run their parallel regions on an OpenMP team that belongs to the thread
calling them: libgomp, which torch's Linux wheels bundle, keeps a pool of worker threads per
calling thread. A server runs its model on a thread of its own (``lmref.serving.engine``). When
the thread that starts it has already run torch work (a notebook that trained or loaded a
model first, a test), two pools stand on the CPUs; libgomp then counts more threads than CPUs,
lets idle workers spin only briefly ("throttled") and puts them to sleep, and each of the
engine's few hundred parallel regions a decode step wakes a sleeping thread. Measured on a
2-core AMD EPYC (SmolLM2-135M, fp32, 2 threads, the model loaded in the main thread, its decode
stepped in another): a one-row step 33-35 ms there against 17.6 ms in the main thread, and
16.8-17.9 ms once the main thread had released its workers (16 rows: 53.0 -> 30.7 ms).
``OMP_WAIT_POLICY=ACTIVE`` made it worse (every worker of both pools spins) and
``GOMP_SPINCOUNT`` does not lift the throttle; releasing the pool does.

The released workers come back the next time the calling thread runs a parallel region: a
thread that keeps running torch work beside a server competes with it for the cores anyway.

Usage::

    from lmref.core.threads import release_openmp_workers

    release_openmp_workers()   # in the thread that hands its torch work to another thread
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_OMP_PAUSE_SOFT = 1  # OpenMP 5.0's omp_pause_soft: free the threads, keep nothing else paused


@functools.cache
def _loaded_libgomp() -> ctypes.CDLL | None:
    """torch's libgomp when it is already loaded in this process (RTLD_NOLOAD: never a second
    copy), with OpenMP 5's pause call; None otherwise (another OpenMP, or macOS)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        library = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        library.omp_pause_resource_all.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return library


def release_openmp_workers() -> bool:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all`` with
    ``omp_pause_soft``). True when freed; False where torch's OpenMP is not a loaded libgomp,
    or inside a parallel region (nothing is freed then)."""
    library = _loaded_libgomp()
    return library is not None and library.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
