"""Evaluation stage: perplexity, exact match and sample generation on the policies of
``lmref.core.losses``. Imports ``lmref.core`` and ``lmref.models``."""
