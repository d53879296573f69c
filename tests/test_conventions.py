"""The project's conventions, checked: copyable modules, documented modules, thin notebooks, and
committed notebooks that carry their outputs (plots included) and quote only numbers they show."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GLUE = {"__init__.py", "course.py", "env.py", "train.py", "serve.py"}  # may import other modules
MODULES = sorted(p for p in (ROOT / "lmref").glob("*.py") if p.name not in GLUE)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_copyable_alone_and_documented(path):
    """A module imports no other lmref module, except one its top docstring names (a declared
    dependency, e.g. every module on ``lmref.core.device``, the one device/dtype policy)."""
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and "Usage" in docstring, f"{path.name}: top docstring with a usage example"
    for node in ast.walk(tree):
        # The one exception the house rules allow: a dependency that is the point, named in the
        # top docstring (e.g. lmref.training.loop saves through lmref.training.checkpoints).
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            if (node.module or "").split(".")[0] == "lmref":
                assert (
                    node.module != "lmref" and f"lmref.{node.module.split('.')[-1]}" in docstring
                ), f"{path.name} imports {node.module} without naming it in its docstring"
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "lmref" for a in node.names), path.name


def test_no_module_over_600_lines():
    long = {
        p.name: n
        for p in (ROOT / "lmref").glob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, f"over 600 lines: move a coherent concern into a module of its own: {long}"


def test_the_serving_engine_imports_no_web_framework():
    tree = ast.parse((ROOT / "lmref" / "engine.py").read_text())
    names = {
        a.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for a in node.names
    }
    names |= {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "torch" in names and not names & {"flask", "werkzeug", "waitress"}, names


def test_every_course_notebook_exists():
    names = [p.stem[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(1, len(names) + 1)] and len(names) >= 6, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), (
        "first code cell: parameters"
    )
    for cell in code:
        source = "".join(cell["source"])
        tree = ast.parse(
            "\n".join(
                line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
            )
        )
        defined = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        ]
        assert not defined, f"defines {defined[0].name}: move it into lmref"
        assert len(source.splitlines()) <= 25, f"a code cell of {len(source.splitlines())} lines"
    assert any(
        c["cell_type"] == "markdown" and "summary" in "".join(c["source"]).lower()
        for c in nb["cells"]
    ), "a closing summary"
    assert any("assert " in "".join(c["source"]) for c in code), "asserts on the outputs"


# ------------------------------------------------------------------- committed notebook outputs

PLOTS = re.compile(r"\bplt\.|\.plot[.(]|\bax\w*\.(plot|bar|barh|scatter|hist)\(")
# A number quoted as measured: a decimal, a percentage, a ratio ("3.5x") or one with thousands
# separators. Code spans are left out (they show code, not results).
# Plain integers ("50% sparsity", "4 bits") are settings and rules of thumb, not results; a
# number glued to a unit letter ("2.4M parameters", "1.1B") names a model size.
QUOTED = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?=x\b|%|[^\w.]|$)")
# Numbers in markdown that are not this run's (papers, hardware specs, earlier runs that the text
# names as such). Each one is justified where it is written.
NOT_FROM_THE_RUN = {
    "4.70",
    "4.80",
    "2.38",
    "2.11",  # 03: an earlier 60-step experiment, named so
}


def _outputs_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for mime in ("text/plain", "text/html", "text/markdown"):
                parts.append("".join(out.get("data", {}).get(mime, "")))
    return "\n".join(parts)


def _quoted_numbers(nb: dict) -> set[str]:
    found = set()
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = re.sub(r"`[^`]*`", "", "".join(cell["source"]))
            found |= set(QUOTED.findall(text))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_carries_its_outputs_and_plots(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed (make course)"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], "an error in the outputs"
    widgets = [
        o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert not widgets, "widget outputs (tqdm.auto bars) show as errors on GitHub: print text bars"
    for cell in code:
        if PLOTS.search("".join(cell["source"])):
            assert any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])), (
                "a cell that plots carries no image: " + "".join(cell["source"])[:80]
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_numbers_quoted_in_markdown_come_from_the_outputs(path):
    nb = json.loads(path.read_text())
    shown = _outputs_text(nb)
    missing = sorted(n for n in _quoted_numbers(nb) - NOT_FROM_THE_RUN if n not in shown)
    assert not missing, f"quoted in markdown but not in any output: {missing}"
