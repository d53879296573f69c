"""lmref: a notebook-driven course and reference implementation of the LLM engineering stack.

The package is a set of stages on a common core; the unit to copy into another project is one
stage folder plus ``core/`` (and ``models/`` for the stages that declare it):

- ``lmref.core``         the policies every stage uses: device and dtype, losses and perplexity,
                         memory measurement, rank/world, hashing, process supervision
- ``lmref.data``         corpus sources, cleaning, dedup, split, tokenizer, packing, instructions
- ``lmref.models``       presets, the one model loader, the packaged real model
- ``lmref.training``     the loop, checkpoints and resume, distributed, LoRA, distillation
- ``lmref.tuning``       hyperparameter search on Optuna
- ``lmref.compression``  pruning and quantization
- ``lmref.evaluation``   perplexity, exact match, sample generation
- ``lmref.serving``      the generation engine (no web framework) and the OpenAI-compatible app
- ``lmref.production``   the Batch API, its Celery worker, the shared response cache
- ``lmref.lab``          tooling for the notebooks, benchmarks and tests: not for copying
- ``python -m lmref.train`` / ``python -m lmref.serve``: the entry points

Stages import ``core`` and not each other, except along the declared edges (serving, training,
compression and evaluation use models; production uses serving and models): the import-linter
contracts in ``pyproject.toml`` hold this. Importing any module changes no global state (no
warnings filter, logger level or monkeypatch): tests/test_no_side_effects_on_import.py.
"""

__version__ = "0.1.0"
