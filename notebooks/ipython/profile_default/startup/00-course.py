"""Run by each course notebook's kernel before its first cell (the Makefile points IPYTHONDIR
here): it quiets two notices that are expected offline, so saved outputs show what the lessons
print. Nothing else; lmref itself changes no global state on import.
"""

import logging
import warnings

# Progress bars are text everywhere, notebooks included: saved notebooks then show them on
# GitHub, where widget outputs (tqdm.auto's notebook bars) render as errors. ipywidgets is
# therefore not a dependency, and tqdm.auto's note that it is missing is expected.
warnings.filterwarnings("ignore", message="IProgress not found")

# bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries at import (transformers imports it
# through peft) to fetch a faster 4-bit kernel from the Hugging Face hub with the optional
# `kernels` package, and logs "Failed to load CPU gemm_4bit_forward" when it cannot. Offline its
# built-in kernel is the intended path (notebook 03 measures it).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
