"""Where lmref writes what it generates (converted models, trained bases, runs, data sets).

In order: ``$LMREF_ARTIFACTS`` when set; else ``artifacts/`` of the source checkout when the
package runs from one (a ``pyproject.toml`` naming ``lmref`` beside the package folder, as
after ``pip install -e .``); else a per-user cache, ``$XDG_CACHE_HOME/lmref/artifacts`` or
``~/.cache/lmref/artifacts``. The folder beside an installed package is never used: after a
normal ``pip install`` that is site-packages, which is shared, often read-only, and wiped by
the next upgrade.

Usage::

    from lmref.models.artifacts import ARTIFACTS, checkout_root

    ARTIFACTS / "base"          # e.g. /home/me/lmref/artifacts/base in a checkout
    checkout_root()             # the checkout's root, or None for an installed package
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the lmref/ folder


def checkout_root(package_dir: str | os.PathLike = PACKAGE_DIR) -> Path | None:
    """The source checkout holding ``package_dir``, or None when the package is installed.

    A checkout is recognised by a ``pyproject.toml`` beside the package folder whose project
    is named ``lmref``: an installed copy has site-packages (no such file) beside it.
    """
    root = Path(package_dir).resolve().parent
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    # A line match, not a TOML parse: tomllib is Python 3.11+, and lmref supports 3.10.
    return root if re.search(r"""^name\s*=\s*["']lmref["']""", text, re.MULTILINE) else None


def artifacts_dir(
    environ: Mapping[str, str] | None = None, package_dir: str | os.PathLike = PACKAGE_DIR
) -> Path:
    """The artifacts folder for this environment and install layout (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if environ.get("LMREF_ARTIFACTS"):
        return Path(environ["LMREF_ARTIFACTS"])
    root = checkout_root(package_dir)
    if root is not None:
        return root / "artifacts"
    cache = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lmref" / "artifacts"


# Resolved once, when first imported: every stage and notebook of one process sees one folder.
ARTIFACTS = artifacts_dir()
