"""ONNX export of the vision, text and pool stages with torch.onnx (dynamo exporter).

Only the axes the runtime needs are dynamic: frames T, alignment text length L, and the window
table's K (tokens) and W (tokens per window). Their ranges go to the manifest, where TensorRT's
optimisation profiles will read them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ppllava.errors import ExportError
from ppllava.export.stages import STAGES
from ppllava.seeded import Seeded

log = logging.getLogger(__name__)

# Above this many parameter bytes a stage's weights go to an external .onnx.data file (protobuf caps
# a single file at 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30

# stage -> input -> {axis: dynamic dimension name}
DYNAMIC_AXES = {
    "vision": {"pixel_values": {0: "T"}},
    "text": {"clip_ids": {1: "L"}, "clip_mask": {1: "L"}},
    "pool": {"features": {0: "T"}, "window_index": {0: "K", 1: "W"}},
}


def dynamic_ranges(model, max_frames: int, default_frames: int) -> dict[str, dict[str, int]]:
    """min / opt / max of every dynamic dimension, for the manifest and for TensorRT profiles."""
    cfg = model.config
    opt_t = min(default_frames, max_frames)
    video = cfg.pooling.video_plan()
    try:
        (o_t, o_h, o_w), kernel, _ = video.resolve((opt_t, *cfg.grid))
        opt_k, opt_w = o_t * o_h * o_w, kernel[0] * kernel[1] * kernel[2]
    except ValueError:
        opt_k, opt_w = 1, 1
    positions = model.alignment.positions
    all_tokens = max_frames * cfg.num_patches  # a 1x1x1 plan keeps every token; one window may span all
    return {
        "T": {"min": 1, "opt": opt_t, "max": max_frames},
        "L": {"min": 1, "opt": min(77, positions), "max": positions},
        "K": {"min": 1, "opt": opt_k, "max": all_tokens},
        "W": {"min": 1, "opt": opt_w, "max": all_tokens},
    }


def example_inputs(model, stage: str, frames: int, dtype: torch.dtype, seed: int = 1234) -> tuple:
    """Inputs for tracing (and, with another seed and size, for verification)."""
    cfg = model.config
    g = Seeded(seed)
    if stage == "vision":
        S = cfg.image_size
        return (torch.from_numpy(g.normal(frames, 3, S, S)).to(dtype),)
    if stage == "text":
        length = min(30, model.alignment.positions)
        vocab = model.multi_modal_projector.clip_text_model.embeddings.token_embedding.num_embeddings
        return (torch.from_numpy(g.integers(3, vocab - 1, 1, length)), torch.ones(1, length, dtype=torch.long))
    features = torch.from_numpy(g.normal(frames, cfg.num_patches, cfg.vision["hidden_size"])).to(dtype)
    # The projector may sit on a GPU (the torch stages' copy): the ids go where it is, the result
    # comes back to the CPU like every other example input.
    where = next(model.multi_modal_projector.parameters()).device
    ids, mask = example_inputs(model, "text", frames, dtype, seed)
    with torch.no_grad():
        text = model.multi_modal_projector.text_embedding(ids.to(where), mask.to(where)).cpu()
    try:
        index = cfg.pooling.video_plan().window_index((frames, *cfg.grid))
    except ValueError:  # too few frames for the video windows: trace with the image plan instead
        index = cfg.pooling.image_plan().window_index((frames, *cfg.grid))
    index = torch.from_numpy(index)
    return (features, text.to(dtype), index)


def dynamic_shapes(stage: str, ranges: dict[str, dict[str, int]]) -> dict:
    """torch.export's dynamic_shapes for a stage, from the manifest's ranges (shared by the ONNX and
    the AOTInductor exports)."""
    # torch.export needs max > min; a 1-frame engine still traces with room for 2 (the manifest keeps 1).
    dims = {name: torch.export.Dim(name, min=r["min"], max=max(r["max"], r["min"] + 1)) for name, r in ranges.items()}
    return {
        arg: {axis: dims[dim] for axis, dim in DYNAMIC_AXES[stage].get(arg, {}).items()} or None
        for arg in STAGES[stage].inputs
    }


def export_stage(model, stage: str, out_path: Path, ranges: dict[str, dict[str, int]], frames: int,
                 dtype: torch.dtype) -> dict:
    """Export one stage to ``out_path``; returns its manifest entry (IO names, dtypes, shapes)."""
    spec = STAGES[stage]
    module = spec.wrapper(model).eval()
    inputs = example_inputs(model, stage, frames, dtype)
    dynamic = dynamic_shapes(stage, ranges)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # The exporter logs at WARNING that torchvision's ops are not registered (we use none of them).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, inputs, str(out_path), input_names=list(spec.inputs), output_names=list(spec.outputs),
                dynamic_shapes=dynamic, dynamo=True, external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; its first line says what failed
            raise ExportError(f"torch.onnx could not export the {stage} stage: {str(exc).strip().splitlines()[0]}") from exc
    return describe_onnx(out_path)


def describe_onnx(path: Path) -> dict:
    """Input/output names, element types and shapes (dynamic axes by name) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def io(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    return {"inputs": io(model.graph.input), "outputs": io(model.graph.output)}
