"""Serving stage: the generation engine (request states, scheduler, KV cache and batching,
sampler, detokenizer; no web framework) and the OpenAI-compatible Flask app over it. Imports
``lmref.core`` and ``lmref.models``."""
