"""The project's conventions, checked: the layering of lmref's stages (import-linter), documented
and short modules without repeated blocks, every test classified, thin notebooks, and committed
notebooks that carry their outputs (plots included) and quote only numbers they show."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmref"
# protoc's output (lmref/serving/grpc_gen, remade by its regenerate module) is not written by hand.
GENERATED = ("_pb2.py", "_pb2_grpc.py")
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if not p.name.endswith(GENERATED))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 400
DUPLICATE_LINES = 6


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


# ------------------------------------------------------------------------ layering and modules


def test_the_import_contracts_hold():
    """core imports no stage; stages import each other only along the declared edges; no stage
    imports lab/ or an entry point; the serving engine needs no web framework ([tool.importlinter]
    in pyproject.toml)."""
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


# One breach per contract, written into a copy of the package: the contract must report it.
BREACHES = {
    "core-imports-a-stage": ("core/device.py", "lmref.data.sources", "core imports no stage"),
    "stage-imports-a-stage": ("data/sources.py", "lmref.training.loop", "stages are independent"),
    "reverse-of-an-edge": ("models/loading.py", "lmref.serving.engine", "stages are independent"),
    "stage-imports-lab": ("serving/sampler.py", "lmref.lab.course", "no stage imports the tooling"),
    "engine-imports-flask": ("serving/engine.py", "flask", "the serving engine"),
    "worker-entry-imported": ("lab/course.py", "lmref.production.celery_worker", "nothing imports"),
}


@pytest.mark.parametrize("breach", BREACHES)
def test_each_import_contract_catches_a_breach(breach, tmp_path):
    module, imported, contract = BREACHES[breach]
    shutil.copytree(PACKAGE, tmp_path / "lmref", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "lmref" / module
    target.write_text(target.read_text() + f"\nimport {imported}  # noqa\n")
    run = _lint_imports(tmp_path, env={"PYTHONPATH": str(tmp_path)})  # the copy, not the install
    assert run.returncode != 0, run.stdout
    assert re.search(rf"^{re.escape(contract)}.* BROKEN", run.stdout, re.MULTILINE), run.stdout
    assert imported in run.stdout, run.stdout


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_module_has_a_top_docstring_with_usage(path):
    """What the module is for, and a short usage; a package's __init__ says what the package is."""
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring, f"{_rel(path)}: no top docstring"
    if path.name != "__init__.py":
        assert "Usage" in docstring, f"{_rel(path)}: the top docstring has no usage example"


def test_no_module_over_400_lines():
    long = {_rel(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, (
        f"over {MAX_LINES} lines: move a coherent concern into a module of its own: {long}"
    )


# -------------------------------------------------------------------------- repeated blocks
# The definition of the library's `duplicates` tool: six or more lines the same, with white space
# folded; blank lines, comments, lone punctuation and import lines are passed over. Windows made
# only of docstring lines are prose, not code, and do not count.


def _code_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, folded text, in a docstring) for each line that counts."""
    tree = ast.parse(text)
    skip, docs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            skip.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    kept = []
    for number, line in enumerate(text.splitlines(), 1):
        folded = " ".join(line.split())
        if number in skip or not re.search(r"\w", folded) or folded.startswith("#"):
            continue
        kept.append((number, folded, number in docs))
    return kept


def repeated_blocks(files: dict[str, str], size: int = DUPLICATE_LINES) -> list[str]:
    """Pairs of places that share ``size`` or more counted lines, as 'a.py:3-9 ~ b.py:20-26'."""
    lines = {name: _code_lines(text) for name, text in files.items()}
    places = defaultdict(list)
    for name, kept in lines.items():
        for i in range(len(kept) - size + 1):
            window = kept[i : i + size]
            if not all(doc for _, _, doc in window):
                places[tuple(text for _, text, _ in window)].append((name, i))
    pairs = set()
    for found in places.values():
        for a, (name_a, i) in enumerate(found):
            for name_b, j in found[a + 1 :]:
                if name_a != name_b or j >= i + size:  # not a window overlapping itself
                    pairs.add((name_a, i, name_b, j))
    rows = []
    for name_a, i, name_b, j in sorted(pairs):
        if (name_a, i - 1, name_b, j - 1) in pairs:
            continue  # inside a run already reported from its start
        end = 0
        while (name_a, i + end + 1, name_b, j + end + 1) in pairs:
            end += 1
        a, b = lines[name_a], lines[name_b]
        rows.append(
            f"{name_a}:{a[i][0]}-{a[i + end + size - 1][0]} ~ "
            f"{name_b}:{b[j][0]}-{b[j + end + size - 1][0]}"
        )
    return rows


def test_the_repeated_block_finder_finds_what_it_should():
    body = ["x = load(path)", "y = x + 1", "z = y * 2", "print(z)", "w = z - y", "return w"]
    first = "import os\n\n\ndef f(path):\n" + "".join(f"    {line}\n" for line in body)
    # The same six lines, indented otherwise, with an import, a comment and a blank line between.
    second = "def g(path):\n    # the same\n" + "".join(
        f"        {line}\n" + ("        import os\n\n" if i == 2 else "")
        for i, line in enumerate(body)
    )
    prose = '"""Prose.\n\n' + "".join(f"line {i}\n" for i in range(8)) + '"""\n'
    files = {"a.py": first, "b.py": second, "c.py": prose, "d.py": prose}
    assert repeated_blocks(files) == ["a.py:5-10 ~ b.py:3-10"]
    assert repeated_blocks({"a.py": first, "e.py": first.replace("print(z)", "print(y)")}) == []


def test_no_block_of_six_lines_is_repeated_inside_lmref():
    files = {_rel(p): p.read_text() for p in MODULES}
    rows = repeated_blocks(files)
    assert not rows, "the same lines in two places: give them one home\n" + "\n".join(rows)


# ------------------------------------------------------------------------ test classification


def test_a_test_without_exactly_one_size_marker_stops_the_run(pytester):
    """tests/conftest.py refuses a run in which a test is not exactly one of unit, integration,
    slow: a new test file cannot go unclassified (and so missing from `make unit`)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    markers = "\n".join(f"    {m}" for m in config["markers"])
    pytester.makeini(f"[pytest]\naddopts = --strict-markers\nmarkers =\n{markers}\n")
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(
        test_plain="def test_unmarked():\n    pass\n",
        test_twice="import pytest\n\npytestmark = pytest.mark.unit\n\n"
        "@pytest.mark.slow\ndef test_twice():\n    pass\n",
        test_fine="import pytest\n\npytestmark = pytest.mark.integration\n\n"
        "def test_fine():\n    pass\n",
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stdout.str() + result.stderr.str()
    assert "test_plain.py::test_unmarked" in text and "test_twice.py::test_twice" in text, text
    assert "test_fine" not in text, text
    assert pytester.runpytest("test_fine.py").ret == pytest.ExitCode.OK


# ------------------------------------------------------------------------------------ notebooks


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
# A number quoted in markdown: an integer, a decimal, a percentage, a ratio ("3.5x"), e-notation
# ("1.27e-07") or one with thousands separators. Not numbers: those glued to letters, digits'
# neighbours or hyphens ("int8", "Q4_1", "135M", "SmolLM2-135M", "2:4"), zero-padded notebook
# numbers ("02") and a title's notebook number ("# 11 · ..."), single digits without a unit (counts: "2 processes", "4 bits"; their settings
# are in the code), code spans, link targets, and the "Further reading" and "Exercises" cells
# (papers' years and what a learner's own run should show). There is no allow-list: a number
# that is not this run's is said in words or moved into a reading list.
QUOTED = re.compile(
    r"(?<![\w.,:\-/])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%|x\b)?"
    r"(?![\w:]|[.,]\d|-\w)"
)
SHOWN = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")
NOT_RESULTS = re.compile(r"^#+\s*(further reading|exercises)", re.IGNORECASE | re.MULTILINE)


def _markdown_numbers(text: str) -> set[str]:
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"^# \d\d ·", "#", text, flags=re.M)  # a title's notebook number ("# 11 · ...")
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"<[^>]+>", "", text)  # html attributes (image sizes)
    found = set()
    for number, unit in QUOTED.findall(text):
        if re.fullmatch(r"0\d", number) or (re.fullmatch(r"\d", number) and not unit):
            continue
        found.add(number + unit)
    return found


def _shown_values(text: str) -> set[float]:
    return {float(m.replace(",", "")) for m in SHOWN.findall(text)}


def _matches(quoted: str, shown: set[float]) -> bool:
    """A quoted number is shown when a shown value rounds to it at the quoted precision (a
    percentage also as a fraction: "56.4%" is 0.5642); e-notation at its significant digits."""
    percent = quoted.endswith("%")
    number = quoted.rstrip("%x").replace(",", "")
    q = float(number)
    if "e" in number:
        digits = len(number.split("e")[0].replace(".", "").lstrip("0")) or 1
        return any(v != 0 and float(f"{v:.{digits - 1}e}") == q for v in shown)
    decimals = len(number.split(".")[1]) if "." in number else 0
    candidates = [v for v in shown] + ([100 * v for v in shown] if percent else [])
    return any(abs(round(v, decimals) - q) < 10 ** -(decimals + 3) for v in candidates)


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
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and not NOT_RESULTS.search(text):
            found |= _markdown_numbers(text)
    return found


def _evidence(nb: dict) -> set[float]:
    """What a run shows (its outputs) and what it was told (its code: the settings)."""
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    return _shown_values(_outputs_text(nb) + "\n" + code)


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
    shown = _evidence(nb)
    missing = sorted(n for n in _quoted_numbers(nb) if not _matches(n, shown))
    assert not missing, f"quoted in markdown but not in any output or setting: {missing}"


def test_the_number_check_catches_what_it_should():
    shown = _shown_values(
        "exact match 0.5642 [0.52-0.61]\nlargest difference 1.27e-07\n6,420 tok/s"
    )
    quoted = _markdown_numbers(
        "reaches 56.4% (79% before), within 1.3e-07 or 6e-7, 6,420 tokens/s and 14x faster, "
        "`1.5` in code, [link](https://x/2021), int8 in notebook 02 on SmolLM2-135M with 2 cores"
    )
    assert quoted == {"56.4%", "79%", "1.3e-07", "6e-7", "6,420", "14x"}
    assert sorted(q for q in quoted if not _matches(q, shown)) == ["14x", "6e-7", "79%"]


def test_readme_course_table_quotes_the_committed_outputs():
    """Every number in the README's "what it measured" column is in that notebook's outputs."""
    rows = re.findall(
        r"^\| (\d\d) [^|]+\| [^|]+\| (.+) \|$", (ROOT / "README.md").read_text(), re.M
    )
    assert len(rows) == len(NOTEBOOKS), f"the README's course table has {len(rows)} rows"
    for number, measured in rows:
        (path,) = [p for p in NOTEBOOKS if p.name.startswith(number)]
        shown = _evidence(json.loads(path.read_text()))
        missing = sorted(n for n in _markdown_numbers(measured) if not _matches(n, shown))
        assert not missing, f"README row {number}: not in {path.name}'s outputs: {missing}"
