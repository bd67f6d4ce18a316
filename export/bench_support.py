"""What ``ppllava bench`` needs from the heavy side: random-weight engines at real shapes and the
PyTorch baseline. Imported lazily by the bench command, only for those options."""

from __future__ import annotations

import os
from pathlib import Path

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.presets import PRESETS, build_random_checkpoint


def cache_root() -> Path:
    return Path(os.environ.get("PPLLAVA_CACHE", "~/.cache/ppllava")).expanduser() / "bench"


def random_engine(preset: str, report=print) -> tuple[Path, Path]:
    """(checkpoint, engine dir) for a random-weight preset, built once and reused from the cache."""
    root = cache_root() / preset
    checkpoint, engine = root / "checkpoint", root / "engine"
    if not (checkpoint / "config.json").is_file():
        report(f"building random-weight checkpoint '{preset}' in {checkpoint}")
        build_random_checkpoint(preset, checkpoint)
    if not (engine / "manifest.json").is_file():
        dtype = "fp16" if PRESETS[preset].get("dtype") == "float16" else "fp32"
        report(f"exporting {preset} ({dtype}) to {engine}")
        export_engine(ExportOptions(checkpoint, engine, dtype=dtype, force=engine.exists()), report=report)
    return checkpoint, engine
