"""What ``ppllava bench`` needs from the heavy side: random-weight engines at real shapes and the
PyTorch baseline. Imported lazily by the bench command, only for those options."""

from __future__ import annotations

from pathlib import Path

from ppllava import paths
from ppllava.export.engine import ExportOptions, export_engine
from ppllava.presets import PRESETS, build_random_checkpoint


def cache_root() -> Path:
    return paths.cache_root() / "bench"


def random_engine(preset: str, report=print, torch_stages: bool = False, int8_vision: bool = False) -> tuple[Path, Path]:
    """(checkpoint, engine dir) for a random-weight preset, built once and reused from the cache.

    ``torch_stages``: an engine for ``--backend torch`` (AOTInductor stages compiled for this
    machine's GPU, or its CPU; no ONNX LLM, which that backend does not use), kept apart.
    ``int8_vision``: also the int8 vision variant ``ask`` runs by default (``int8_vision_variant``)."""
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
    if int8_vision and not torch_stages:
        int8_vision_variant(engine, root, report)
    return checkpoint, engine


HELD_OUT_CLIPS = 4


def int8_vision_variant(engine: Path, root: Path, report=print) -> bool:
    """The product's default CPU path for a random-weight engine: ``ppllava calibrate`` on a few
    synthetic clips (moving patterns written as MP4), then ``ppllava quantize --stages vision
    --precision int8`` (dynamic: every clip is held out), recorded only if it passes the accuracy
    threshold. True if a passing variant is (or already was) recorded."""
    from ppllava.calibration.dataset import build_calibration_set
    from ppllava.calibration.quantize import QUANT_JSON, THRESHOLDS, quantize_stages, read_report
    from ppllava.errors import QuantizationError
    from ppllava.runtime.manifest import Manifest

    existing = Manifest.load(engine).stage_variant("vision", "onnxruntime:int8")
    if existing is not None:
        return not existing.get("below_threshold")
    # A refusal stands for this engine (a rebuilt one has no quant.json): the same random weights,
    # clips and threshold would only be refused again, minutes later, on every bench run.
    refused = read_report(engine, ("stages", "int8"))
    if (refused and refused.get("below_threshold") and refused.get("quantized_now") == ["vision"]
            and refused.get("method") == "dynamic" and refused.get("thresholds") == THRESHOLDS
            and refused.get("held_out_clips") == HELD_OUT_CLIPS):
        report(f"int8 vision was refused for this engine before (visual-token cosine min "
               f"{refused['visual_tokens']['cosine_min']:.4f} < {THRESHOLDS['visual_tokens_cosine']}, "
               f"{engine / QUANT_JSON}); the bench runs the exported stages")
        return False
    videos = root / "calibration-videos"
    videos.mkdir(parents=True, exist_ok=True)
    paths = [_synthetic_video(videos / f"clip{i}.mp4", seed=i) for i in range(HELD_OUT_CLIPS)]
    report(f"int8 vision: calibration set of {len(paths)} synthetic clips, then dynamic per-channel quantization")
    build_calibration_set(engine, paths, root / "calibration", progress=lambda _: None)
    try:
        result = quantize_stages(engine, root / "calibration", ["vision"], "int8", progress=report, method="dynamic")
    except QuantizationError as exc:
        report(f"int8 vision not recorded ({exc}); the bench runs the exported stages")
        return False
    report(f"int8 vision recorded: visual-token cosine min {result['visual_tokens']['cosine_min']:.5f} on "
           f"{result['held_out_clips']} held-out clips")
    return True


def _synthetic_video(path: Path, seed: int, frames: int = 48, size: int = 336) -> Path:
    """An MP4 of moving coloured patterns and noise (OpenCV's mp4v writer), different per seed."""
    import cv2
    import numpy as np

    from ppllava.runtime.bench import synthetic_frames

    if path.is_file():
        return path
    rgb = synthetic_frames(frames, size=size, seed=seed)
    rgb = np.roll(rgb, 17 * seed, axis=2)  # each seed its own phase, not only its own noise
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, (size, size))
    for frame in rgb:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    return path
