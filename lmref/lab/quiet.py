"""Quiet notebook outputs: a notebook shows results, not progress bars or notices that are noise.

Three sources of noise, each turned off here rather than in every notebook:

- tqdm's "IProgress not found" warning, raised once when transformers or datasets first import
  ``tqdm.auto`` in a Jupyter kernel without ipywidgets (the bars are off anyway, below);
- the progress bars of datasets (``map``) and transformers (loading and saving weights), which
  finish in about a second here and would leave hundreds of stderr lines in a notebook;
- bitsandbytes' notice that its optional hub kernel is missing (``quiet_cpu_kernel_notice``),
  logged when bitsandbytes is imported (transformers' ``Trainer`` and peft import it).

Usage, first in a notebook, before the imports it must precede::

    from lmref.lab.quiet import quiet_notebook

    quiet_notebook()

This module imports nothing heavy at its top, so that the call can come before transformers.
"""

from __future__ import annotations

import warnings


def quiet_notebook() -> None:
    """Turn off the three kinds of noise above for this process (idempotent)."""
    warnings.filterwarnings("ignore", message="IProgress not found")
    import datasets
    from transformers.utils import logging as hf_logging

    from lmref.models.quantized import quiet_cpu_kernel_notice

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    quiet_cpu_kernel_notice()
