"""Which grammar library constrains the server's JSON output: xgrammar vs llguidance on a CPU.

For SmolLM2-135M-Instruct's 49k-token vocabulary (``artifacts/smollm2-135m-instruct``):

1. Set-up: building each library's tokenizer view once (per model) and compiling one typical
   JSON schema (a nested object with enums, arrays, numbers with bounds, optional fields).
2. Mask cost: the tokens of a valid instance are fed one at a time; before each, the library
   fills the allowed-token bitmask and the mask is applied to a (1, vocab) logits row; the time
   per token is the median with its range over the instance's tokens and repeats.
3. Coverage: a list of JSON-schema keywords, each in a small schema; whether the library
   compiles it, and the message when it refuses (what a client's 400 would say).

    python benchmarks/grammar_mask.py    # writes benchmarks/results/grammar_mask-cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lmref.core.stats import Spread
from lmref.lab.env import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "artifacts/smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "tags": ["math", "engines"],
    "address": {"city": "London"},
    "score": 9.5,
}
KEYWORDS = {
    "pattern": {"type": "string", "pattern": "^[a-z]+$"},
    "format": {"type": "string", "format": "date-time"},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object"}, {"required": ["a"]}]},
    "not": {"not": {"type": "string"}},
    "$ref": {"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"},
    "const": {"const": "x"},
    "multipleOf": {"type": "integer", "multipleOf": 3},
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "minProperties": {"type": "object", "minProperties": 2},
    "patternProperties": {"type": "object", "patternProperties": {"^a": {"type": "string"}}},
    "if/then": {"if": {"type": "string"}, "then": {"minLength": 2}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        self.compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        )

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher, logits: torch.Tensor) -> None:
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)
        matcher.fill_next_token_bitmask(bitmask, 0)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.vocab = llguidance, vocab
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer
        )
        if is_error:
            raise ValueError(messages[0])
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def mask(self, matcher, logits: torch.Tensor) -> None:
        bitmask = self.llg.torch.allocate_token_bitmask(1, self.vocab)
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        self.llg.torch.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


def measure(lib_type, tokenizer, vocab: int, tokens: list[int], repeats: int) -> dict:
    start = time.perf_counter()
    lib = lib_type(tokenizer, vocab)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lib.compile(SCHEMA)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        matcher = lib.matcher(compiled)
        for token in tokens:
            logits = torch.zeros(1, vocab)
            start = time.perf_counter()
            lib.mask(matcher, logits)
            times.append(time.perf_counter() - start)
            if logits[0, token].item() == float("-inf") or not lib.accept(matcher, token):
                raise RuntimeError(f"{lib.name} refused token {token} of a valid instance")
    coverage = {}
    for keyword, schema in KEYWORDS.items():
        try:
            lib.compile(schema)
            coverage[keyword] = "ok"
        except Exception as exc:  # each library raises its own type: the message is the point
            coverage[keyword] = f"refused: {str(exc)[:160]}"
    spread = Spread.of([t * 1e6 for t in times])
    return {
        "setup_s": round(setup, 3),
        "compile_ms": round(compile_s * 1e3, 2),
        "mask_us_per_token": {
            "median": round(spread.median, 1),
            "low": round(spread.low, 1),
            "high": round(spread.high, 1),
            "n": spread.repeats,
        },
        "coverage": coverage,
    }


def main() -> None:
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    vocab = AutoConfig.from_pretrained(MODEL).vocab_size
    tokens = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")))
    result = {
        "cpu": cpu_model(),
        "model": MODEL,
        "vocab": vocab,
        "instance_tokens": len(tokens),
        "libraries": {
            lib.name: measure(lib, tokenizer, vocab, tokens, repeats=5)
            for lib in (XGrammar, LLGuidance)
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grammar_mask-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
