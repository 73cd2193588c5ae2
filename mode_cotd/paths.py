"""Where mode-cotd finds the shared data and keeps its caches; each overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The MoDE-CoTD data folder: ``$MODE_COTD_DATA``, else ``<repo>/../shared/data/mode-cotd``."""
    env = os.environ.get("MODE_COTD_DATA")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared" / "data" / "mode-cotd"


def cache_dir() -> Path:
    """mode-cotd's cache (converted student, composites): ``$MODE_COTD_CACHE``, else ``~/.cache/mode-cotd``."""
    env = os.environ.get("MODE_COTD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mode-cotd"
