"""Data stage: sources in any language and encoding, cleaning, dedup, filters, PII, split,
tokenizer, packing, and the instruction task set. Imports ``lmref.core`` only."""
