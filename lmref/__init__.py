"""lmref: a notebook-driven course and reference implementation of the LLM engineering stack.

Each module is one concern and can be copied into another project on its own (with the few
modules it names in its docstring, e.g. ``lmref.core.device``):

- ``lmref.data.sources``     where a corpus comes from: text files, stdlib docstrings, HF datasets
- ``lmref.data.pipeline``        corpus cleaning, dedup, filters, split, tokenizer, packing (uses sources)
- ``lmref.data.instructions``  the instruction task set, prompt template, loss masking, collator
- ``lmref.core.device``      the one device and precision policy (cuda/cpu; bf16, fp16 or fp32)
- ``lmref.models.loading``    model presets, loading any Hugging Face causal LM, the packaged real model
- ``lmref.training.loop``    one training loop: mixed precision, accumulation, checkpoint/resume
- ``lmref.training.checkpoints`` crash-safe checkpoint folders: manifest, verification (used by training)
- ``lmref.evaluation.metrics``  perplexity, exact match, sample generation
- ``lmref.training.lora``        LoRA and QLoRA with peft + bitsandbytes
- ``lmref.training.distributed`` data parallelism under torchrun
- ``lmref.core.processes``   child processes under a time limit: streamed log, stacks on timeout, kill
- ``lmref.compression.methods`` pruning and quantization
- ``lmref.serving.engine``      the generation engine: queue, batching, KV cache, sampling, stops
- ``lmref.serving.app``     an OpenAI-compatible Flask app over the engine (``python -m lmref.serve``)
- ``lmref.lab.loadtest``    a load generator and a server-process helper for benchmarks
- ``lmref.tuning.search``      hyperparameter search with Optuna: samplers, pruning, resumable studies
- ``lmref.training.distillation`` knowledge distillation loss (KL at a temperature + CE), chunked
- ``lmref.lab.course``      glue for the notebooks: rebuild earlier artifacts when missing
"""

__version__ = "0.1.0"

import logging as _logging
import warnings as _warnings

# Progress bars are text everywhere, notebooks included: saved notebooks then show them on GitHub,
# where widget outputs (tqdm.auto's notebook bars) render as errors. ipywidgets is therefore not a
# dependency, and tqdm.auto's note that it is missing is expected, not a problem to report.
_warnings.filterwarnings("ignore", message="IProgress not found")

# bitsandbytes >= 0.50 tries, on CPUs with AVX512-BF16, to fetch a faster 4-bit kernel from the
# Hugging Face hub through the optional `kernels` package, and warns when it cannot. Offline its
# built-in kernel is the intended path, so the warning is noise here.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
