"""prefixflow's cache folder: GGUF conversions and compiled kernels live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/prefixflow, or PREFIXFLOW_CACHE_DIR where it is set."""
    root = os.environ.get("PREFIXFLOW_CACHE_DIR") or Path.home() / ".cache" / "prefixflow"
    return Path(root).expanduser().absolute()
