"""``ppllava doctor``: which backends are usable here, and whether an engine dir fits this machine
(and the Jetson devices), by a memory estimate from its manifest."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

JETSONS = {"Jetson Orin Nano 8 GB": 8, "Jetson Orin NX 16 GB": 16, "Jetson AGX Orin 64 GB": 64}
USABLE_FRACTION = 0.7  # Jetson memory is shared with the OS and the video decoder


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def backends() -> list[tuple[str, str]]:
    rows = []
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        rows.append(("onnxruntime", f"{ort.__version__}: providers {', '.join(ort.get_available_providers())}"))
    else:
        rows.append(("onnxruntime", "not installed (pip install 'ppllava[runtime]')"))
    for label, package, module in (("onnxruntime-genai", "onnxruntime-genai", "onnxruntime_genai"),
                                   ("TensorRT", "tensorrt", "tensorrt"), ("TensorRT-LLM", "tensorrt_llm", "tensorrt_llm"),
                                   ("Polygraphy", "polygraphy", "polygraphy")):
        found = importlib.util.find_spec(module) is not None
        rows.append((label, (_version(package) or "installed") if found else "not installed"))
    rows.append(("torch backend", torch_backend()))
    rows.append(("GPU", gpu()))
    return rows


def torch_backend() -> str:
    """PyTorch for ``--backend torch``: reported from package metadata (importing torch takes seconds)."""
    version = _version("torch") if importlib.util.find_spec("torch") else None
    if version is None:
        return "not installed (pip install torch transformers)"
    missing = "" if importlib.util.find_spec("transformers") else "; transformers missing (the LLM needs it)"
    return f"torch {version}{missing}; stages from `ppllava export --torch`"


def gpu() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU visible (nvidia-smi not found)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return out.stdout.strip() or f"nvidia-smi: {out.stderr.strip() or 'no devices'}"


def memory_estimate(engine_dir: Path) -> dict:
    """Bytes for weights (the artifacts the runtime loads), vision activations and the KV cache."""
    from ppllava.runtime.manifest import Manifest

    manifest = Manifest.load(engine_dir, check_files=False)
    weights = 0
    for stage in manifest.data["stages"].values():
        weights += sum(f["bytes"] for f in stage.get("files", {}).values())
    weights += sum(f["bytes"] for f in manifest.data.get("files", {}).values())
    dims = manifest.dims
    itemsize = 2 if manifest.stage("vision").get("precision") in ("fp16", "int8", "fp8") else 4
    # vision activations: all frames at once; ~12 live (T, N+1, C) tensors inside a layer (MLP 4C, attention)
    activations = dims["max_frames"] * (dims["num_patches"] + 1) * dims["vision_hidden"] * itemsize * 12
    kv = 0
    llm_dir = engine_dir / "llm" / "genai_config.json"
    if llm_dir.is_file():
        dec = json.loads(llm_dir.read_text())["model"]["decoder"]
        kv_itemsize = 4 if manifest.stage("llm").get("precision") == "fp32" else 2
        kv = dec["num_hidden_layers"] * 2 * dec["num_key_value_heads"] * dec["head_size"] * dims["llm_context"] * kv_itemsize
    return {"weights": weights, "activations": activations, "kv_cache": kv, "total": weights + activations + kv}


def report(engine_dir: Path | None) -> list[str]:
    lines = [f"{name:<18} {status}" for name, status in backends()]
    if engine_dir is None:
        return lines
    est = memory_estimate(engine_dir)
    gib = lambda b: b / 2**30  # noqa: E731
    lines.append(f"\nengine {engine_dir}: needs about {gib(est['total']):.2f} GiB "
                 f"(weights {gib(est['weights']):.2f}, vision activations {gib(est['activations']):.2f}, "
                 f"KV cache at full context {gib(est['kv_cache']):.2f})")
    for device, total in JETSONS.items():
        usable = total * USABLE_FRACTION
        verdict = "fits" if gib(est["total"]) <= usable else "does NOT fit"
        lines.append(f"  {device:<24} {verdict} ({usable:.1f} GiB usable)")
    return lines
