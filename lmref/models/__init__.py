"""Models stage: presets, the one loader (any Hugging Face id or path, optionally 4-bit or
8-bit), and the packaged real model (SmolLM2-135M-Instruct from its GGUF). Imports ``lmref.core`` only.

- ``presets``     named shapes, ``build_model`` (random init, the caller's RNG untouched), reports
- ``loading``     THE loader: ``load_model``, ``load_tokenizer``, ``resolve_model``
- ``quantized``   bitsandbytes config and its explicit setup step (run by the loader)
- ``real_model``  the packaged GGUF model and its checked conversion
- ``artifacts``   where generated files go (``LMREF_ARTIFACTS``, the checkout, or a user cache)
"""
