"""The two ways to install lmref (pip via pyproject.toml, conda via environment.yml) agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge spells a few packages differently


def split(requirement: str) -> tuple[str, str]:
    # Extras stay part of the name: "transformers[serving]" (the bench extra) is a requirement of
    # its own beside plain "transformers".
    name, spec = re.match(
        r"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)(.*)", requirement.replace(" ", "")
    ).groups()
    return name.lower().replace("_", "-"), spec


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return dict(split(r) for r in project["dependencies"] + extras["dev"] + extras["bench"])


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    found = {}
    for dep in env["dependencies"]:
        for req in dep["pip"] if isinstance(dep, dict) else [dep]:
            if req.startswith(("-e", "python", "pip")) and not req.startswith("pip:"):
                continue
            name, spec = split(req)
            found[CONDA_NAMES.get(name, name)] = spec
    return found


def test_environment_yml_matches_pyproject():
    pip, conda = pyproject_requirements(), conda_requirements()
    assert pip == conda, {
        k: (pip.get(k), conda.get(k))
        for k in pip.keys() | conda.keys()
        if pip.get(k) != conda.get(k)
    }


def test_packages_of_record_are_bounded_above():
    # API drift between majors is what breaks courses: these must carry an upper bound.
    pip = pyproject_requirements()
    for name in ("transformers", "datasets", "peft", "bitsandbytes", "nbval", "tokenizers"):
        assert "<" in pip[name], f"{name} has no upper bound: {pip[name]!r}"


def test_python_version_of_environment_is_supported():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(
        map(int, required.removeprefix(">=").split("."))
    )
