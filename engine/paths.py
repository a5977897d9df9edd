"""Where meshserve keeps what it builds or converts on this machine (a leaf module: imports nothing of the project)."""

from __future__ import annotations

import os


def cache_root() -> str:
    """Directory holding converted checkpoints and built kernels: $MESHSERVE_CACHE, else ~/.cache/meshserve."""
    return os.path.abspath(os.path.expanduser(os.environ.get("MESHSERVE_CACHE") or "~/.cache/meshserve"))
