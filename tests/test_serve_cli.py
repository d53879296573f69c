"""``python -m lmref.serve``: flags from the config dataclasses, API keys, and every mistake on the
command line a usage error (exit 2) instead of a traceback or a process that never serves."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmref.core.manifest import write_manifest
from lmref.serve import build_parser, config_from_args, flags_dataclass

pytestmark = pytest.mark.integration  # each mistake runs its own process

ROOT = Path(__file__).resolve().parent.parent
# Each case: the arguments ({tiny} is a real model folder) and what the message must name.
MISTAKES = {
    "missing model folder": (["--model", "x=/no/such/folder"], "no such folder"),
    "port out of range": (["--model", "t={tiny}", "--port", "99999"], "0..65535"),
    "mistyped template path": (
        ["--model", "t={tiny}", "--chat-template", "templates/chat.jinja"],
        "no such file",
    ),
    "duplicate model name": (["--model", "t={tiny}", "--model", "t={tiny}"], "more than once"),
    "unknown alias target": (["--model", "t={tiny}", "--alias", "ab=t:1,ghost:1"], "ghost"),
}


def serve_command(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python -m lmref.serve ARGS`` in a child process of this checkout, with no keys and one
    thread; ``subprocess.TimeoutExpired`` past ``timeout`` (the process is killed)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LMREF_API_KEYS": "",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "lmref.serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cli_runs(tiny_model_dir) -> dict:
    """All mistakes at once, each in its own process; a process still running after 60 s (serving
    or 'loading') is killed and recorded as the TimeoutExpired it raised."""

    def run(args: list[str]):
        args = [a.replace("{tiny}", str(tiny_model_dir)) for a in args]
        try:
            return serve_command([*args, "--torch-threads", "1"], timeout=60)
        except subprocess.TimeoutExpired as exc:
            return exc

    with cf.ThreadPoolExecutor(len(MISTAKES)) as pool:
        return dict(zip(MISTAKES, pool.map(run, [args for args, _ in MISTAKES.values()])))


@pytest.mark.parametrize("case", MISTAKES)
def test_command_line_mistakes_are_usage_errors(cli_runs, case):
    result = cli_runs[case]
    assert not isinstance(result, subprocess.TimeoutExpired), f"{case}: the server kept running"
    assert result.returncode == 2, result.stderr[-2000:]
    assert "usage: python -m lmref.serve" in result.stderr and "Traceback" not in result.stderr
    assert MISTAKES[case][1] in result.stderr


def test_flags_come_from_the_config_dataclasses(tiny_model_dir):
    config = config_from_args(
        [
            "--model",
            f"t={tiny_model_dir}",
            "--max-batch-size",
            "3",
            "--threads",
            "5",
            "--max-tokens-limit",
            "64",
            "--port",
            "0",
            "--default-max-tokens",
            "8",
            "--unbatched",
            "t",
        ]
    )
    assert [m.name for m in config.models] == ["t", "t-unbatched"]
    assert all(m.pack_linears for m in config.models)  # a bool field: --[no-]pack-linears
    unpacked = config_from_args(["--model", f"t={tiny_model_dir}", "--no-pack-linears"])
    assert not unpacked.models[0].pack_linears
    assert [m.max_batch_size for m in config.models] == [3, 1]
    assert (config.server_threads, config.max_tokens_limit, config.default_max_tokens) == (5, 64, 8)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = config_from_args(["--model", f"t={tiny_model_dir}", "--chat-template", template])
    assert config.models[0].chat_template == template  # text, since it is a template


def test_api_keys_from_the_flag_and_documented(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LMREF_API_KEYS", "from-env")
    config = config_from_args(
        ["--model", f"t={tiny_model_dir}", "--api-key", "k1", "--api-key", "k2"]
    )
    assert config.resolved_api_keys() == ["k1", "k2"]  # the flag wins over the environment
    assert config_from_args(["--model", f"t={tiny_model_dir}"]).resolved_api_keys() == ["from-env"]
    help_text = build_parser().format_help()
    assert "--api-key" in help_text and "LMREF_API_KEYS" in help_text
    readme = (ROOT / "README.md").read_text()
    assert "--api-key" in readme and "LMREF_API_KEYS" in readme


def test_a_model_that_fails_to_load_ends_the_process(tmp_path):
    """An existing folder that holds no model (its manifest verifies: an empty folder's): the
    process says why and exits 1, instead of answering 503 'loading' for ever."""
    write_manifest(tmp_path)
    result = serve_command(["--model", f"empty={tmp_path}", "--port", "0"], timeout=120)
    assert result.returncode == 1
    assert "model failed to load" in result.stderr and str(tmp_path) in result.stderr


@dataclasses.dataclass
class _WithOptionalBool:  # the field kind the old annotation-string parser crashed on
    name: str  # assembled by hand, like --model: left out of the flags
    warmup: bool | None = None  # None: decide by itself
    compile: bool = True
    budget: float | None = None


def test_a_bool_or_none_field_parses():
    """Flags come from ``HfArgumentParser`` over the dataclass fields, so ``bool | None`` (and
    ``float | None``) work; the old parser split annotation strings and raised KeyError."""
    from transformers import HfArgumentParser

    flags = flags_dataclass(_WithOptionalBool, frozenset({"name"}))
    assert [f.name for f in dataclasses.fields(flags)] == ["warmup", "compile", "budget"]
    parser = HfArgumentParser(flags)

    def parse(*argv: str):
        return parser.parse_args_into_dataclasses(list(argv), look_for_args_file=False)[0]

    assert (parse().warmup, parse().compile, parse().budget) == (None, True, None)
    assert parse("--warmup", "true").warmup is True
    assert parse("--warmup", "false").warmup is False
    assert parse("--no-compile").compile is False and parse("--budget", "2.5").budget == 2.5
    with pytest.raises(SystemExit):  # not a boolean: a usage error
        parse("--warmup", "maybe")
    # The server's own flags carry their aliases in field metadata.
    args = build_parser().parse_args(["--threads", "3", "--drain-timeout", "1.5"])
    assert (args.server_threads, args.drain_timeout_s) == (3, 1.5)
