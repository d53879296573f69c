"""One home per policy, and its callers agree: the causal-LM loss and perplexity
(``lmref.core.losses``) as the trainer, the evaluation stage, distillation and Hugging Face
compute them; peak memory (``lmref.core.memory``) as the trainer and a benchmark measure it;
rank and world (``lmref.core.ranks``) as the loop, checkpoints and the launcher helpers see
them; and the dataclass-to-CLI path of ``python -m lmref.train``."""

from __future__ import annotations

import ast
import dataclasses
import io
import math
import time
import tokenize
from pathlib import Path

import datasets
import pytest
import torch

from lmref.core import losses, ranks
from lmref.core.memory import PeakMemory
from lmref.evaluation.metrics import perplexity as evaluation_perplexity
from lmref.models.presets import build_model
from lmref.training import distributed
from lmref.training.config import TrainingConfig
from lmref.training.distillation import DistillationConfig, distillation_loss
from lmref.training.loop import evaluate_loss, train

pytestmark = pytest.mark.unit

LMREF = Path(__file__).resolve().parents[1] / "lmref"
VOCAB, PAD = 97, 0
MiB = 2**20


def small_model(seed: int = 0) -> torch.nn.Module:
    return build_model(
        "tiny",
        seed=seed,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    ).eval()


# Rows of different lengths: right-padded with PAD, the prompt of each masked with -100.
ROWS = [
    {"ids": [5, 17, 33, 8, 61, 2, 40, 9], "prompt": 2},
    {"ids": [12, 7, 90, 3], "prompt": 1},
    {"ids": [44, 45, 46, 47, 48, 49], "prompt": 3},
]


def collate(rows: list[dict]) -> dict:
    """Right padding with an attention mask; padded labels keep the PAD id (not -100), as a
    collator that only masks the prompt writes them: the mask alone must keep them out."""
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, PAD)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        mask[i, :n] = 1
        labels[i, :n] = ids[i, :n]
        labels[i, : r["prompt"]] = losses.IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def real_targets() -> int:
    """Next-token targets that count: after the prompt, inside the row."""
    return sum(len(r["ids"]) - max(r["prompt"], 1) for r in ROWS)


def test_loss_equals_hugging_face_where_both_are_defined():
    model = small_model()
    for row in ROWS:  # one row a batch: no padding, where HF's labels= loss is the same policy
        batch = collate([row])
        del batch["attention_mask"]
        ours = losses.causal_lm_loss(model, batch)
        theirs = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_padded_batch_counts_no_padded_token():
    """The padded batch scores exactly what its rows score alone; the old evaluation
    perplexity counted the padded positions (their labels are not -100)."""
    model = small_model().requires_grad_(False)
    nll_alone = sum(float(losses.causal_lm_loss_sum(model, collate([r]))[0].double()) for r in ROWS)
    result = evaluation_perplexity(model, ROWS, batch_size=3, collate_fn=collate)
    assert result["tokens"] == real_targets() == 12
    assert result["loss"] == pytest.approx(nll_alone / real_targets(), rel=1e-6)
    loss_sum, tokens = losses.causal_lm_loss_sum(model, collate(ROWS))
    assert int(tokens) == real_targets()
    assert float(loss_sum) == pytest.approx(nll_alone, rel=1e-5)


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_answer_loss_is_the_causal_lm_loss_and_its_gradient(wrap):
    """answer_loss_sum computes the head only at counted positions: the same sum, count and
    gradients as causal_lm_loss_sum, also through a peft model (which passes logits_to_keep on)."""
    from lmref.training.lora import LoraSettings, add_lora

    model = small_model().train()
    if wrap == "lora":
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        for name, p in model.named_parameters():  # B starts at 0: make the update non-zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    batch = collate(ROWS)
    results = []
    for loss_fn in (losses.causal_lm_loss_sum, losses.answer_loss_sum):
        model.zero_grad()
        loss, tokens = loss_fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), int(tokens), grads))
    (plain, plain_n, plain_g), (answer, answer_n, answer_g) = results
    assert answer_n == plain_n == real_targets()
    torch.testing.assert_close(answer, plain, rtol=1e-5, atol=1e-5)
    assert plain_g.keys() == answer_g.keys() and plain_g
    for name in plain_g:
        torch.testing.assert_close(answer_g[name], plain_g[name], rtol=1e-4, atol=1e-6)


def test_evaluation_perplexity_equals_the_training_loss_on_the_same_batches():
    model = small_model()
    for batch_size in (1, 2, 3):
        evaluated = evaluation_perplexity(model, ROWS, batch_size=batch_size, collate_fn=collate)
        trained = evaluate_loss(model, ROWS, batch_size=batch_size, collate_fn=collate)
        core = losses.perplexity(model, [collate(ROWS)])
        assert evaluated["loss"] == pytest.approx(trained, rel=1e-12)
        assert evaluated["loss"] == pytest.approx(core["loss"], rel=1e-6)
        assert evaluated["perplexity"] == pytest.approx(math.exp(trained), rel=1e-12)
        assert evaluated["tokens"] == core["tokens"] == real_targets()


def test_distillation_without_the_teacher_is_the_training_loss():
    student, teacher = small_model(0), small_model(1)
    batch = collate(ROWS)
    blended = distillation_loss(teacher, DistillationConfig(alpha=0.0, chunk_tokens=3))
    kd_sum, kd_tokens = blended(student, batch)
    ce_sum, ce_tokens = losses.causal_lm_loss_sum(student, batch)
    assert int(kd_tokens) == int(ce_tokens) == real_targets()  # padding: counted by neither
    torch.testing.assert_close(kd_sum, ce_sum, rtol=1e-5, atol=1e-5)


def _numbers_after_minus(source: str) -> list[int]:
    """Line numbers of ``-100`` written as a number in code (not in strings or comments)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    return [
        b.start[0]
        for a, b in zip(tokens, tokens[1:])
        if a.type == tokenize.OP and a.string == "-" and b.type == tokenize.NUMBER
        if b.string == "100"
    ]


def _calls(source: str, names: set[str]) -> list[int]:
    """Line numbers of attribute or name calls/reads named in ``names``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = getattr(node, "attr", None) or getattr(node, "id", None)
        if isinstance(node, ast.Attribute | ast.Name) and name in names:
            found.append(node.lineno)
    return found


POLICY_HOMES = {
    "core/allocator.py": ({"mallopt"}, "the allocator's settings"),
    "core/losses.py": ({"cross_entropy"}, "the causal-LM loss"),
    "core/memory.py": ({"ru_maxrss", "max_memory_allocated"}, "peak memory"),
    "core/ranks.py": ({"get_rank", "get_world_size"}, "rank and world"),
}


def test_each_policy_is_computed_in_its_one_home():
    """No module outside ``lmref/core`` computes a loss, a peak or a rank of its own, and -100
    is written once (``IGNORE_INDEX``). Before: 4 losses, 2 peaks, 3 rank helpers."""
    strays = []
    for path in sorted(LMREF.rglob("*.py")):
        rel = path.relative_to(LMREF).as_posix()
        source = path.read_text()
        if rel != "core/losses.py":
            strays += [f"{rel}:{n}: -100" for n in _numbers_after_minus(source)]
        for home, (names, what) in POLICY_HOMES.items():
            if rel != home:
                strays += [f"{rel}:{n}: {what} outside {home}" for n in _calls(source, names)]
    assert strays == []


# ---------------------------------------------------------------- peak memory


def test_nested_measurements_keep_the_outer_peak():
    """A block that enters another one (train() inside a benchmark's PeakMemory) resets the
    process-wide high-water mark; the outer block still reports what it reached before."""
    with PeakMemory("cpu") as outer:
        big = torch.ones(256 * MiB // 4)  # 256 MiB, every page touched
        del big
        with PeakMemory("cpu") as inner:
            pass
    if outer.added_mb is None:
        pytest.skip("no /proc/self/status here")
    assert outer.added_mb >= 0.9 * 256
    assert inner.peak_mb <= outer.peak_mb


def test_the_trainer_reports_the_peak_the_caller_measures(tmp_path):
    ids = torch.randint(1, VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    config = TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        logging_steps=1,
        disable_tqdm=True,
    )
    held = []
    # Raise the process's lifetime high-water mark (ru_maxrss) well above this run's peak.
    torch.ones(512 * MiB // 4).sum()

    def allocate(step: int, metrics: dict) -> None:
        if step == 2:
            held.append(torch.ones(256 * MiB // 4))  # 256 MiB held to the end of the run

    model = small_model()
    with PeakMemory("cpu") as outer:
        result = train(model, data, config, callbacks=[allocate])
    if outer.peak_mb is None:
        pytest.skip("no /proc/self/status here")
    assert outer.added_mb >= 0.9 * 256
    # One measurement: the run's peak is the caller's, up to what setup before the loop held.
    assert result.peak_memory_mb <= outer.peak_mb + 1
    assert result.peak_memory_mb >= outer.peak_mb - 32
    logged = [h["memory_mb"] for h in result.history if "memory_mb" in h]
    assert logged == sorted(logged) and logged[-1] <= result.peak_memory_mb + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_counts_a_known_allocation():
    with PeakMemory("cuda") as mem:
        block = torch.ones(256 * MiB // 4, device="cuda")
        del block
    assert 256 <= mem.added_mb < 256 + 8


# ---------------------------------------------------------------- rank and world


def test_every_caller_sees_one_rank_and_world(monkeypatch, capsys, tmp_path):
    """torchrun's variables without a joined group: rank 1 of 2 for everyone. Before, the loop
    and checkpoints said rank 0 of 1 (and so trained alone and wrote files) while the
    distributed helpers said rank 1 of 2."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks.rank_and_world() == (1, 2) and not ranks.is_main()
    distributed.print0("only rank 0 prints this")
    assert capsys.readouterr().out == ""
    ids = torch.randint(1, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    config = TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=1, disable_tqdm=True)
    with pytest.raises(RuntimeError, match="rank 1 of 2 .* joined no process group"):
        train(small_model(), data, config)
    with pytest.raises(RuntimeError, match="rank 1 of 2"):
        evaluate_loss(small_model(), data)
    assert not (tmp_path / "run").exists()
    for helper in ("get_rank", "get_world_size", "is_main"):
        assert not hasattr(distributed, helper) or getattr(distributed, helper) is getattr(
            ranks, helper
        )


# ---------------------------------------------------------------- dataclass to command line


@dataclasses.dataclass
class Switches:
    pin_memory: bool | None = dataclasses.field(
        default=None, metadata={"help": "None: let the loader decide"}
    )
    fused: bool = True
    limit: int | None = 5


def test_cli_parser_handles_optional_bools_and_none():
    from lmref.core.cli import DataclassArgumentParser

    def parse(*argv: str) -> Switches:
        return DataclassArgumentParser(Switches).parse_args_into_dataclasses(
            list(argv), look_for_args_file=False
        )[0]

    assert parse() == Switches(None, True, 5)
    assert parse("--pin-memory").pin_memory is True
    assert parse("--pin-memory", "false").pin_memory is False
    assert parse("--no-pin-memory").pin_memory is False
    assert parse("--no-fused", "--limit", "none") == Switches(None, False, None)
    # The dataclass's own field keeps its union (HfArgumentParser narrows it to int in place).
    assert {f.name: f.type for f in dataclasses.fields(Switches)}["limit"] == int | None


def test_both_command_lines_derive_from_dataclasses_through_the_one_parser():
    """``python -m lmref.train`` and ``python -m lmref.serve`` build their flags the same way,
    so ``none`` switches an optional number off on both."""
    from lmref import serve, train
    from lmref.core.cli import DataclassArgumentParser

    assert isinstance(train.build_parser(), DataclassArgumentParser)
    assert isinstance(serve.build_parser(), DataclassArgumentParser)
    assert train.parse_config(["--max-grad-norm", "none"]).training.max_grad_norm is None
    assert serve.config_from_args(["--max-tokens-limit", "none"]).max_tokens_limit is None


# ---------------------------------------------------------------- process supervision

GRANDCHILD = (
    "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(60)'], start_new_session=True); "
    "print('started', child.pid, flush=True); time.sleep(60)"
)


def _gone(pid: int) -> bool:
    import psutil

    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_stopped_service_leaves_no_process_of_its_tree():
    """The servers tests and notebooks start (``lmref.lab.services.Service``) stop through the
    one supervision helper, ``lmref.core.processes.stop_tree``, as timed-out jobs do: a
    descendant in a session of its own (torchrun's workers start so) goes too."""
    import sys

    from lmref.lab.services import Service

    service = Service("grandparent", [sys.executable, "-c", GRANDCHILD])
    service.wait_for_text("started", timeout=30)
    child = int(next(line for line in service.output if line.startswith("started")).split()[1])
    service.stop(timeout=5)
    time.sleep(0.5)
    assert _gone(service.pid) and _gone(child)
