"""Which code made a result: the package version and, in a git checkout, the commit.

A run records it in its summary and a report stamps it on every table and plot, so a published
figure can be traced to the code (and the command) that made it.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *arguments], capture_output=True, text=True,
                              timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, str | bool | None]:
    """{"version", "commit", "modified"}: commit and modified are None outside a git checkout;
    modified says whether the package's files differ from that commit."""
    try:
        version = metadata.version("p2p_fedrot")
    except metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--", ".") if commit else None
    return {"version": version, "commit": commit, "modified": bool(changes) if commit else None}


def describe(code: dict | None) -> str:
    """One phrase: 'p2p_fedrot 0.1.0 at commit 1a2b3c4d5e6f (with local changes)'."""
    if not code:
        return "code version not recorded"
    text = f"p2p_fedrot {code.get('version') or '(version unknown)'}"
    if code.get("commit"):
        text += f" at commit {code['commit'][:12]}" + (" (with local changes)" if code.get("modified") else "")
    return text
