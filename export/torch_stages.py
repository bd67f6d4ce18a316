"""PyTorch-native stages for the ``torch`` backend: ``torch.export`` + AOTInductor packages (.pt2).

Each of vision / text / pool is exported with the same wrappers, dynamic axes and ranges as the
ONNX stages, then compiled by AOTInductor for one device (the GPU it will run on, or the CPU) and
one dtype. The package is device-specific, like a TensorRT plan: the manifest records the device,
the GPU's name and compute capability and the torch version, and the runtime refuses a package
compiled elsewhere with the command that rebuilds it.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from ppllava.errors import PPLLaVAError, TorchExportError
from ppllava.export.onnx_stages import DYNAMIC_AXES, dynamic_shapes, example_inputs
from ppllava.export.stages import STAGES
from ppllava.model import DTYPES
from ppllava.runtime.backends import first_line

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: DTYPES[name] for name in ("fp32", "fp16", "bf16")}  # what --torch-dtype takes
STAGE_NAMES = ("vision", "text", "pool")


def resolve_device(device: str) -> str:
    """'auto' -> cuda when a GPU is usable, else cpu; 'cuda' without a GPU is one clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise PPLLaVAError(f"--torch-device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PPLLaVAError("--torch-device cuda: no CUDA GPU is usable here (torch.cuda.is_available() is False)")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bf16 on a GPU that supports it (fp16 otherwise), fp32 on the CPU."""
    if dtype == "auto":
        if device == "cpu":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if dtype not in TORCH_DTYPES:
        raise PPLLaVAError(f"--torch-dtype must be auto or one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    return dtype


def device_identity(device: str) -> dict:
    """What a compiled package is tied to: torch version, device, and for CUDA the GPU and its SM;
    for the CPU the architecture and the vector instruction set Inductor compiled for (a package
    built with AVX-512 dies with SIGILL on an AVX2-only CPU). The runtime computes the same."""
    from ppllava.runtime.backends.pytorch import current_identity

    return current_identity(device)


def stage_model(model, dtype: str, device: str):
    """A copy of the reference in the stages' dtype on their device (the reference stays fp32 on CPU)."""
    target = TORCH_DTYPES[dtype]
    if target == torch.float32 and device == "cpu":
        return model
    # Only the vision tower and the projector are exported; the LLM is not copied.
    return SimpleNamespace(
        config=model.config, alignment=model.alignment,
        vision_tower=copy.deepcopy(model.vision_tower).to(device=device, dtype=target),
        multi_modal_projector=copy.deepcopy(model.multi_modal_projector).to(device=device, dtype=target),
    )


def _on(inputs: tuple, device: str, dtype: torch.dtype) -> tuple:
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs)


def export_torch_stage(model, stage: str, out_path: Path, ranges: dict[str, dict[str, int]], frames: int,
                       dtype: str, device: str) -> dict:
    """torch.export one stage with dynamic T / L / K / W and compile it with AOTInductor into
    ``out_path`` (.pt2). Returns the IO description for the manifest."""
    spec = STAGES[stage]
    module = spec.wrapper(model).eval()
    inputs = _on(example_inputs(model, stage, frames, torch.float32), device, TORCH_DTYPES[dtype])
    dynamic = dynamic_shapes(stage, ranges)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # torch.export raises many types; the first line says what failed
            raise TorchExportError(f"torch.export failed for the {stage} stage: {first_line(exc)}") from exc
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(out_path))
        except Exception as exc:  # inductor / the C++ or CUDA toolchain
            raise TorchExportError(f"AOTInductor could not compile the {stage} stage for {device}: "
                                   f"{first_line(exc)} (a C++ compiler is needed, and Triton for CUDA)") from exc
    dyn_names = {arg: {str(axis): name for axis, name in DYNAMIC_AXES[stage].get(arg, {}).items()} for arg in spec.inputs}
    return {
        "inputs": [{"name": n, "dtype": _dtype_name(t), "rank": t.dim(), "dynamic": dyn_names[n]}
                   for n, t in zip(spec.inputs, inputs)],
        "outputs": [{"name": n} for n in spec.outputs],
    }


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
            torch.int64: "int64"}.get(t.dtype, str(t.dtype).removeprefix("torch."))
