"""The release gate: a candidate version becomes ``champion`` only when it is not worse than the
champion beyond a stated margin, on the same held-out items, with the evidence in the registry.

Both versions are fetched from the registry (``lmref.models.registry``: downloaded, verified),
loaded by the one loader and scored by greedy exact match (``lmref.evaluation.metrics``) on the
same items: by default the first ``items`` rows of the course's instruction validation split
(``lmref.data.instructions``, built with the training defaults, so no item was trained on), in
its prompt template; or a JSONL file of ``{"prompt", "answer"}``. The decision is
non-inferiority on the paired difference (``lmref.evaluation.paired``: candidate minus champion,
Newcombe's paired 95% interval): promoted iff its lower bound > -margin. A small item count
cannot show non-inferiority at a small margin (two identical models on 30 items: about +-7
points), so the gate then refuses: say more items, not a wider margin.

Promotion moves two aliases: ``previous`` to the former champion and ``champion`` to the
candidate, so ``rollback`` is one alias move back. Either way the candidate version gets tags
``gate.*``: both scores with intervals, the difference and its interval, margin, items and their
sha256, decision and time. Promotion is a choice, so by the course's evaluation policy it is
made on validation; the test split stays for the final number of the model that ships
(``split="test"`` is there for a deployment whose test set is its release set).

Usage::

    from lmref.evaluation.gate import GateConfig, release_gate

    decision = release_gate(GateConfig("lmref-chat", candidate="@challenger", margin=0.05))
    decision.promoted, str(decision.difference)

    python -m lmref.evaluation.gate --name lmref-chat --candidate 4 --margin 0.05 --items 100
    # exit 0: promoted; 1: refused (not shown non-inferior); 2: bad input (named on stderr)
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmref.core.stats import Score
from lmref.evaluation.paired import PairedDifference
from lmref.models.registry import (
    RegistryConfig,
    RegistryError,
    alias_version,
    fetch_model,
    resolve_version,
    set_alias,
    tag_version,
)

PROMOTED, REFUSED, BAD_INPUT = 0, 1, 2  # the command's exit statuses


@dataclass
class GateConfig:
    """Which candidate, against which alias, on which items, at which margin."""

    name: str = field(metadata={"help": "the registered model, e.g. lmref-chat"})
    candidate: str = field(metadata={"help": "a version number, or @ALIAS (e.g. @challenger)"})
    margin: float = 0.05  # candidate may be at most this much worse (accuracy points, 0-1)
    items: int = 100  # rows of the instruction split (stratified: every task equally)
    split: str = "validation"  # the instruction split the items come from: a choice is made on
    # validation (the course's policy); "test" only where the test set is the release set
    items_file: str | None = None  # JSONL of {"prompt", "answer"} instead of the split
    instruction_seed: int = 0  # InstructionConfig.seed the models were trained with
    max_new_tokens: int = 32
    champion_alias: str = "champion"
    previous_alias: str = "previous"  # the former champion, after a promotion: rollback target
    promote: bool = True  # False: decide and tag, move no alias (a dry run)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI
    cache_dir: str | None = None  # None: LMREF_REGISTRY_CACHE or ~/.cache/lmref/registry


@dataclass
class Decision:
    """What the gate found and did; ``tags()`` is what it writes on the candidate version."""

    name: str
    candidate: str  # version
    champion: str  # version
    candidate_score: Score
    champion_score: Score
    difference: PairedDifference  # candidate minus champion
    margin: float
    items: int
    items_sha256: str
    promoted: bool
    reason: str
    decided_at: str  # UTC, ISO 8601

    def tags(self) -> dict[str, str]:
        low, high = self.difference.interval
        return {
            "gate.decision": "promoted" if self.promoted else "refused",
            "gate.reason": self.reason,
            "gate.champion_version": self.champion,
            "gate.candidate_score": str(self.candidate_score),
            "gate.champion_score": str(self.champion_score),
            "gate.difference": f"{self.difference.difference:.4f}",
            "gate.difference_interval": f"[{low:.4f}, {high:.4f}]",
            "gate.discordant": f"{self.difference.only_a} better, {self.difference.only_b} worse",
            "gate.margin": str(self.margin),
            "gate.items": str(self.items),
            "gate.items_sha256": self.items_sha256,
            "gate.method": "exact match; Newcombe paired 95% interval; promote iff low > -margin",
            "gate.decided_at": self.decided_at,
        }


def gate_items(config: GateConfig) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: the file's, or the first ``items`` rows of ``config.split``."""
    if config.items_file:
        path = Path(config.items_file)
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            pairs = [(str(r["prompt"]), str(r["answer"])) for r in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"--items-file {path}: need JSON lines with prompt and answer ({exc})"
            ) from exc
        return pairs[: config.items] if config.items else pairs
    from lmref.data.instructions import format_prompt

    if config.split not in ("validation", "test"):
        raise ValueError(f"--split is validation or test, not {config.split!r}")
    split = _instruction_set(config.instruction_seed)[config.split]
    if not 0 < config.items <= len(split):
        raise ValueError(
            f"--items must be 1..{len(split)} (the {config.split} split), not {config.items}"
        )
    rows = split.select(range(config.items))
    return [(format_prompt(r["instruction"]), r["answer"]) for r in rows]


@functools.lru_cache(maxsize=2)
def _instruction_set(seed: int):
    """The instruction set's splits, built once per seed in a process (about 7 s here: the whole
    set is rebuilt so that its splits equal the ones the models were trained beside)."""
    from lmref.data.instructions import InstructionConfig, make_instruction_dataset

    return make_instruction_dataset(InstructionConfig(seed=seed))[0]


def score_version(name: str, version: str, items, config: GateConfig) -> list[bool]:
    """Per-item exact-match outcomes of one registered version (fetched and verified first)."""
    from lmref.evaluation.metrics import exact_match
    from lmref.models.loading import load_model, load_tokenizer

    registry = RegistryConfig(config.tracking_uri, config.cache_dir)
    folder = fetch_model(f"models:/{name}/{version}", registry)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    prompts, answers = [p for p, _ in items], [a for _, a in items]
    return exact_match(model, tokenizer, prompts, answers, config.max_new_tokens)["hits"]


def release_gate(config: GateConfig) -> Decision:
    """Score champion and candidate on the same items, decide, tag the candidate, and (when
    promoted and ``config.promote``) move ``previous`` and ``champion``. ``ValueError`` (a
    ``RegistryError`` among them) for bad input: no champion, the candidate is the champion."""
    if not 0 <= config.margin < 1:
        raise ValueError(f"--margin is a share of items in [0, 1), not {config.margin}")
    registry = RegistryConfig(config.tracking_uri, config.cache_dir)
    uri = f"models:/{config.name}" + (
        config.candidate if config.candidate.startswith("@") else f"/{config.candidate}"
    )
    name, candidate = resolve_version(uri, registry)
    champion = alias_version(name, config.champion_alias, registry)
    if champion is None:
        raise RegistryError(
            f"{name} has no @{config.champion_alias} to compare with: set the first one by hand "
            f"(lmref.models.registry.set_alias)"
        )
    if champion == candidate:
        raise RegistryError(f"{uri} is version {candidate}, already @{config.champion_alias}")
    items = gate_items(config)
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()
    champion_hits = score_version(name, champion, items, config)
    candidate_hits = score_version(name, candidate, items, config)
    difference = PairedDifference.of(candidate_hits, champion_hits)
    low = difference.interval[0]
    promoted = low > -config.margin
    reason = (
        f"lower bound {low:+.4f} {'>' if promoted else '<='} -margin {-config.margin:+.4f}"
        f" on {len(items)} paired items"
    )
    decision = Decision(
        name=name,
        candidate=candidate,
        champion=champion,
        candidate_score=difference.a,
        champion_score=difference.b,
        difference=difference,
        margin=config.margin,
        items=len(items),
        items_sha256=digest,
        promoted=promoted,
        reason=reason,
        decided_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    tag_version(name, candidate, decision.tags(), registry)
    if promoted and config.promote:
        set_alias(name, config.previous_alias, champion, registry)  # rollback: one move back
        set_alias(name, config.champion_alias, candidate, registry)
    return decision


def rollback(name: str, config: GateConfig | None = None) -> str:
    """Point ``champion`` back at ``previous``; returns that version."""
    config = config or GateConfig(name, "")
    registry = RegistryConfig(config.tracking_uri, config.cache_dir)
    previous = alias_version(name, config.previous_alias, registry)
    if previous is None:
        raise RegistryError(f"{name} has no @{config.previous_alias} to roll back to")
    set_alias(name, config.champion_alias, previous, registry)
    return previous


def main(argv: list[str] | None = None) -> int:
    """The command: prints the decision as one JSON object; exit 0 promoted, 1 refused, 2 bad
    input (argparse's usage errors, an unknown model or version, no champion, bad items)."""
    from lmref.core.cli import DataclassArgumentParser

    parser = DataclassArgumentParser(
        [GateConfig],
        prog="python -m lmref.evaluation.gate",
        description="Promote a registered candidate to champion iff it is non-inferior.",
        epilog="exit status: 0 promoted, 1 refused, 2 bad input",
    )
    (config,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    try:
        decision = release_gate(config)
    except ValueError as exc:  # RegistryError is one: what is wrong, named
        print(f"gate: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(json.dumps({"name": decision.name, "candidate": decision.candidate, **decision.tags()}))
    return PROMOTED if decision.promoted else REFUSED


if __name__ == "__main__":
    sys.exit(main())
