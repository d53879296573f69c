"""The engine's warm-up: one full batch prefilled and stepped at start, before any request.

The first burst of requests a server meets otherwise pays for memory nobody has touched yet:
the slot cache grown to ``max_batch_size`` rows, the prefill's activations, the stacked KV a
join copies. On this project's 2-core AMD EPYC VM, touching fresh pages is at times very slow
(720 MiB of ``torch.zeros``: 133-146 ms in an empty process, up to 3.1 s in one holding
SmolLM2-135M; the VM's balloon hands freed pages back to its host, a likely cause, not pinned
down). A burst then stalls the engine. In ``python -m lmref.serve`` (SmolLM2-135M, fp32, 2
threads) whose process had imported lmref's engine from a ``sitecustomize`` (a tracing hook;
the stall showed in every such run), 64 clients' first burst made 250-409 output tokens/s in
10 runs, one engine step of 3.8-8.6 s, 2.1-3.3 s of it growing the slot cache; with this
warm-up, 477-541 in 10 runs. The same stall hit ``benchmarks/serving_peer.py``'s plain runs
at times (the code before this, 5 rounds: 356-418 tokens/s at 64 clients in 4 of them, time to
first token p99 2.6-4.4 s, below vLLM's 422-451); where fresh pages were fast, the warm-up
changed nothing measurable (64 clients: 450-612 tokens/s with it, 492-572 without).

vLLM does the same at start: a profiling pass of a full batch, and its KV cache allocated once
for the process's life. Here: ``max_batch_size`` prompts of ``tokens`` tokens, prefilled,
joined and stepped once, then dropped. The engine keeps its slot cache at ``max_batch_size``
slots, and ``python -m lmref.serve`` keeps freed memory in the process
(``lmref.core.allocator``), so the pages stay for the next burst.

Its cost at start (SmolLM2-135M, 2 cores, 32 tokens a row): 0.5 s for 16 rows (the default
``max_batch_size``); for 64 rows 1.5-4.5 s, and 1.8-2.7 s to allocate their slot cache (720
MiB, held from then on). ``ModelSpec.warm_up_tokens = 0`` skips the prefill; the slot cache is
allocated at ``max_batch_size`` slots either way.

Usage::

    warm_up(batch, model, rows=64, tokens=32, pad_id=0)   # batch: SlotBatch or RunningBatch
"""

from __future__ import annotations

import torch

from lmref.serving.batching import Prefill, RunningBatch
from lmref.serving.slot_batch import SlotBatch


@torch.inference_mode()
def warm_up(batch: SlotBatch | RunningBatch, model, rows: int, tokens: int, pad_id: int) -> None:
    """Prefill ``rows`` prompts of ``tokens`` tokens as one group (no prefix cache: nothing is
    learnt from these), join them to the empty ``batch``, run one decode step, and leave."""
    if rows < 1 or tokens < 1 or len(batch):
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = [[(row + column) % vocab for column in range(tokens)] for row in range(rows)]
    prefill = Prefill(model, prompts, pad_id, chunk_tokens=tokens)
    while prefill.step() is None:
        pass
    batch.join(prefill)
    batch.step([pad_id] * rows)
    batch.leave([])
