"""Training stage: the loop, checkpoints and resume, data parallelism under torchrun, LoRA and
QLoRA, distillation. Imports ``lmref.core`` and ``lmref.models`` (the models it trains)."""
