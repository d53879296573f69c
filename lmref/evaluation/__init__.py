"""Evaluation stage: perplexity, exact match and sample generation (metrics), lm-eval against the
server (harness), bits per byte, an LLM judge and a contamination check, on the policies of
``lmref.core.losses``. Imports ``lmref.core`` and ``lmref.models``."""
