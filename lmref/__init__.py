"""lmref: a notebook-driven course and reference implementation of the LLM engineering stack.

Each module is one concern and can be copied into another project on its own:

- ``lmref.data``        corpus, cleaning, dedup, split, tokenizer, packing, instruction data
- ``lmref.modeling``    model presets and loading any Hugging Face causal LM
- ``lmref.training``    one training loop: mixed precision, accumulation, checkpoint/resume
- ``lmref.evaluation``  perplexity, exact match, sample generation
- ``lmref.lora``        LoRA and QLoRA with peft + bitsandbytes
- ``lmref.distributed`` data parallelism under torchrun
- ``lmref.compression`` pruning and quantization
- ``lmref.engine``      the generation engine: queue, batching, KV cache, sampling, stops
- ``lmref.serving``     an OpenAI-compatible Flask app over the engine (``python -m lmref.serve``)
- ``lmref.loadtest``    a load generator and a server-process helper for benchmarks
- ``lmref.course``      glue for the notebooks: rebuild earlier artifacts when missing
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
