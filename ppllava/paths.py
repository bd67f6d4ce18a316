"""Where ppllava keeps per-user state (torch-free; shared by the reference, export and the runtime)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$PPLLAVA_CACHE_DIR, else $XDG_CACHE_HOME/ppllava (the XDG spec ignores a relative value),
    else ~/.cache/ppllava: the feature cache, the demo, the bench's random-weight engines and the
    converted SmolLM2 all live under it."""
    if override := os.environ.get("PPLLAVA_CACHE_DIR"):
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    if not base.is_absolute():
        base = Path("~/.cache").expanduser()
    return base / "ppllava"
