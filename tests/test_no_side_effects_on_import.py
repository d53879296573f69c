"""Importing lmref changes nothing but ``sys.modules``: no warnings filter, no logger level, no
monkeypatch, no Celery app, no reseeded RNG, no environment variable (issue #21).

A fresh interpreter first imports every third-party module that lmref names (what those do on
import is theirs), then imports each lmref module in turn and compares the process's global state
before and after, so a change is charged to the module whose import made it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
# Entry modules whose import is the start of a process, so building there is the point: `celery -A
# lmref.production.celery_worker worker` needs the worker's app as a module attribute. Nothing may
# import them ([tool.importlinter], "protected" contract), so their app is built only in a worker.
STARTS_ON_IMPORT = ["lmref.production.celery_worker"]

PROBE = r"""
import ast, hashlib, importlib, json, logging, os, random, sys, warnings
from pathlib import Path

package = Path(sys.argv[1])

# The third-party modules lmref imports (module level or in a function), and the names it takes
# from them: transformers resolves those lazily, and what that loading does is not lmref's.
for path in sorted(package.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            wanted = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in wanted:
            if module.split(".")[0] == "lmref":
                continue
            try:
                loaded = importlib.import_module(module)
                if name:
                    getattr(loaded, name, None)
            except Exception:  # an optional dependency that is absent: nothing of it to compare
                pass

import numpy
import torch


def bitsandbytes_functions():
    try:
        import bitsandbytes.functional
        import bitsandbytes.nn.modules
    except Exception:
        return {}
    return {
        f"{module.__name__}.{name}": id(value)
        for module in (bitsandbytes.functional, bitsandbytes.nn.modules)
        for name, value in vars(module).items()
        if callable(value)
    }


def celery_apps():
    try:
        from celery import _state
    except Exception:
        return []
    return sorted(repr(app) for app in _state._apps)


def digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def state() -> dict:
    loggers = {
        name: logging.getLevelName(logger.level)
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    }
    return {
        "warnings filters": [
            tuple(getattr(part, "pattern", getattr(part, "__name__", part)) for part in f)
            for f in warnings.filters
        ],
        "root logger": [logging.getLevelName(logging.root.level), [repr(h) for h in logging.root.handlers]],
        "logger levels": loggers,
        "celery apps": celery_apps(),
        "bitsandbytes functions": bitsandbytes_functions(),
        "torch RNG": digest(torch.get_rng_state().tolist()),
        "python RNG": digest(random.getstate()),
        "numpy RNG": digest(numpy.random.get_state()[1].tolist()),
        "torch threads": torch.get_num_threads(),
        "environment": dict(os.environ),
    }


def changes(before: dict, after: dict) -> dict:
    found = {}
    for key in before:
        old, new = before[key], after[key]
        if old == new:
            continue
        if isinstance(old, dict):
            found[key] = {k: [old.get(k), new.get(k)] for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        elif key == "warnings filters":
            found[key] = {"added": [f for f in new if f not in old], "removed": [f for f in old if f not in new]}
        else:
            found[key] = [old, new]
    return found


names = ["lmref"] + sorted(
    ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
    for path in package.rglob("*.py")
    if path.name != "__main__.py"  # run, never imported
)
names = [name for name in names if name not in json.loads(sys.argv[2])]
report = {}
for name in dict.fromkeys(names):
    before = state()
    try:
        importlib.import_module(name)
    except Exception as exc:
        report[name] = {"import failed": f"{type(exc).__name__}: {exc}"}
        continue
    found = changes(before, state())
    if found:
        report[name] = found
print("REPORT " + json.dumps(report, default=str))
"""


def import_report(package: Path = ROOT / "lmref", skip: list[str] = STARTS_ON_IMPORT) -> dict:
    """What importing each lmref module changed, in a fresh interpreter: {module: {what: change}}."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(package), json.dumps(skip)],
        cwd=package.parent,
        env={**os.environ, "PYTHONPATH": str(package.parent)},  # this copy, not the install
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_importing_lmref_changes_no_global_state():
    report = import_report()
    assert not report, "importing these changed global state:\n" + json.dumps(report, indent=1)


def test_the_probe_sees_each_kind_of_side_effect(tmp_path):
    """A package that does each forbidden thing on import is caught, charged to its module; one
    that only creates its own logger is not."""
    package = tmp_path / "lmref"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "bad.py").write_text(
        "import logging, os, random, warnings\n"
        "import torch\n"
        "from celery import Celery\n"
        "from bitsandbytes import functional\n"
        'warnings.filterwarnings("ignore", message="IProgress not found")\n'
        'logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)\n'
        "functional.dequantize_4bit = lambda *a, **k: None\n"
        'app = Celery("bad")\n'
        "torch.manual_seed(0)\n"
        "random.seed(0)\n"
        'os.environ["LMREF_BAD"] = "1"\n'
    )
    (package / "good.py").write_text("import logging\nlog = logging.getLogger(__name__)\n")
    report = import_report(package)
    assert set(report) == {"lmref.bad"}, report
    assert set(report["lmref.bad"]) == {
        "warnings filters",
        "logger levels",
        "bitsandbytes functions",
        "celery apps",
        "torch RNG",
        "python RNG",
        "environment",
    }, report
