"""Where cryospin-lab keeps what it can rebuild: simulated sets, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$CRYOSPIN_LAB_CACHE``, else ``$XDG_CACHE_HOME/cryospin-lab``, else ``~/.cache/cryospin-lab``."""
    if os.environ.get("CRYOSPIN_LAB_CACHE"):
        return Path(os.environ["CRYOSPIN_LAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cryospin-lab"
