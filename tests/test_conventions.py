"""The project's conventions, checked: copyable modules, documented modules, thin notebooks."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GLUE = {"__init__.py", "course.py", "env.py", "train.py", "serve.py"}  # may import other modules
MODULES = sorted(p for p in (ROOT / "lmref").glob("*.py") if p.name not in GLUE)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_copyable_alone_and_documented(path):
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and "Usage" in docstring, f"{path.name}: top docstring with a usage example"
    for node in ast.walk(tree):
        # The one exception the house rules allow: a dependency that is the point, named in the
        # top docstring (e.g. lmref.training saves through lmref.checkpoints).
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert node.level == 0 and (module.split(".")[0] != "lmref" or module in docstring), \
                f"{path.name} imports {module} without naming it in its docstring: copy it alone and it breaks"
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "lmref" for a in node.names), path.name


def test_every_course_notebook_exists():
    names = [p.stem[:2] for p in NOTEBOOKS]
    assert names == ["01", "02", "03", "04", "05", "06"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell: parameters"
    for cell in code:
        source = "".join(cell["source"])
        tree = ast.parse("\n".join(line for line in source.splitlines()
                                   if not line.lstrip().startswith(("%", "!"))))
        defined = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]
        assert not defined, f"defines {defined[0].name}: move it into lmref"
        assert len(source.splitlines()) <= 25, f"a code cell of {len(source.splitlines())} lines"
    assert any(c["cell_type"] == "markdown" and "summary" in "".join(c["source"]).lower()
               for c in nb["cells"]), "a closing summary"
    assert any("assert " in "".join(c["source"]) for c in code), "asserts on the outputs"
