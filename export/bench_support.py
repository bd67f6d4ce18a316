"""What ``ppllava bench`` needs from the heavy side: random-weight engines at real shapes and the
PyTorch baseline. Imported lazily by the bench command, only for those options."""

from __future__ import annotations

import os
from pathlib import Path

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.presets import PRESETS, build_random_checkpoint


def cache_root() -> Path:
    return Path(os.environ.get("PPLLAVA_CACHE", "~/.cache/ppllava")).expanduser() / "bench"


def random_engine(preset: str, report=print, torch_stages: bool = False) -> tuple[Path, Path]:
    """(checkpoint, engine dir) for a random-weight preset, built once and reused from the cache.

    ``torch_stages``: an engine for ``--backend torch`` (AOTInductor stages compiled for this
    machine's GPU, or its CPU; no ONNX LLM, which that backend does not use), kept apart."""
    root = cache_root() / preset
    checkpoint = root / "checkpoint"
    engine = root / ("engine-torch" if torch_stages else "engine")
    if not (checkpoint / "config.json").is_file():
        report(f"building random-weight checkpoint '{preset}' in {checkpoint}")
        build_random_checkpoint(preset, checkpoint)
    if not (engine / "manifest.json").is_file():
        dtype = "fp16" if PRESETS[preset].get("dtype") == "float16" else "fp32"
        report(f"exporting {preset} ({dtype}{', torch stages' if torch_stages else ''}) to {engine}")
        export_engine(ExportOptions(checkpoint, engine, dtype=dtype, force=engine.exists(), torch=torch_stages,
                                    llm="none" if torch_stages else "onnx"), report=report)
    return checkpoint, engine
