"""``ppllava export``: checkpoint -> verified, self-describing engine directory.

The directory is built in a scratch sibling (``runtime/scratch.py``: named for its owner, swept by
the next run if the owner died) and renamed into place only after verification passes, so an
interrupted or failed export leaves nothing that looks like an engine dir, and an existing
directory is replaced only with ``force``. Free space is checked before anything is written.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ppllava import __version__
from ppllava.checkpoint import fingerprint, safetensors_header, weight_files
from ppllava.errors import PPLLaVAError, VerificationError
from ppllava.export import llm as llm_export
from ppllava.export import tokenizers
from ppllava.export.onnx_stages import dynamic_ranges, export_stage
from ppllava.export.templates import choose_template
from ppllava.model import DTYPES as ALL_DTYPES
from ppllava.model import PPLLaVA
from ppllava.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, add_variants, file_records, variant_record
from ppllava.runtime.scratch import new_scratch, require_free, scratch_path, sweep

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 32  # upstream's inference default
DTYPES = {name: ALL_DTYPES[name] for name in ("fp32", "fp16")}  # what the ONNX export writes


@dataclass
class ExportOptions:
    checkpoint: Path
    out: Path
    dtype: str = "fp32"
    max_frames: int | None = None
    llm: str = "onnx"  # "onnx" | "none"
    force: bool = False
    alignment_config: Path | None = None
    alignment_dir: Path | None = None
    template: str = "auto"
    verify: bool = True
    torch: bool = False  # also compile AOTInductor stages for the torch backend
    torch_device: str = "auto"
    torch_dtype: str = "auto"

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise PPLLaVAError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.llm not in ("onnx", "none"):
            raise PPLLaVAError(f"--llm must be 'onnx' or 'none', got {self.llm!r}")
        if self.max_frames is not None and self.max_frames < 1:
            raise PPLLaVAError(f"--max-frames must be >= 1, got {self.max_frames}")
        out, checkpoint = self.out.resolve(), self.checkpoint.resolve()
        if out == checkpoint or out in checkpoint.parents:
            raise PPLLaVAError(f"--out {self.out} is the checkpoint or contains it; choose another directory")
        if self.out.exists() and not self.force:
            raise PPLLaVAError(f"{self.out} already exists; pass --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise PPLLaVAError(f"{self.out} exists and is not a directory")
        if self.out.exists() and any(self.out.iterdir()) and not _is_engine_dir(self.out):
            raise PPLLaVAError(f"{self.out} is not an engine dir; --force only replaces engine dirs (or empty ones)")
        if self.alignment_dir is not None and not self.alignment_dir.is_dir():
            raise PPLLaVAError(f"--alignment-dir {self.alignment_dir} is not a directory")
        from ppllava.export.templates import TEMPLATES

        if self.template != "auto" and self.template not in TEMPLATES:
            raise PPLLaVAError(f"--template must be auto or one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.torch:
            from ppllava.export.torch_stages import resolve_device, resolve_dtype

            self.torch_device = resolve_device(self.torch_device)
            self.torch_dtype = resolve_dtype(self.torch_dtype, self.torch_device)
        parent = self.out.resolve().parent
        if not parent.is_dir():
            raise PPLLaVAError(f"cannot create {self.out}: {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise PPLLaVAError(f"cannot create {self.out}: {parent} is not writable")


def _is_engine_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class StepLog:
    """Progress of the export: one line per step with its elapsed time (the CLI prints them)."""

    report: Callable[[str], None] = log.info
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def run(self, name: str, fn, *args, detail: Callable | None = None, **kwargs):
        self.report(f"[{len(self.rows) + 1}] {name} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        note = detail(result) if detail else ""
        self.rows.append((name, elapsed, note))
        self.report(f"    done in {elapsed:.1f} s{'  ' + note if note else ''}")
        return result


def _tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"ppllava": __version__}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "tokenizers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


_files = file_records


def _preprocessing(checkpoint: Path, model: PPLLaVA, default_frames: int) -> dict:
    """Frame preprocessing: the checkpoint's preprocessor_config.json if present, else the variant's."""
    clip = model.config.variant == "vicuna"
    spec = {
        "size": model.config.image_size,
        "resize": "bicubic",
        "keep_aspect_ratio": False,
        "rescale": 1 / 255,
        "mean": [0.48145466, 0.4578275, 0.40821073] if clip else [0.5, 0.5, 0.5],
        "std": [0.26862954, 0.26130258, 0.27577711] if clip else [0.5, 0.5, 0.5],
        "color": "RGB",
        "default_frames": default_frames,
        "sampling": "segment_centres",
    }
    file = checkpoint / "preprocessor_config.json"
    if file.is_file():
        try:
            raw = json.loads(file.read_text())
            spec["mean"] = [float(v) for v in raw.get("image_mean", spec["mean"])]
            spec["std"] = [float(v) for v in raw.get("image_std", spec["std"])]
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable %s (%s); using the variant's defaults", file, exc)
    return spec


def export_engine(options: ExportOptions, report: Callable[[str], None] = log.info) -> dict:
    """Export, verify, and atomically publish the engine dir. Returns the manifest."""
    sweep(options.out, report)  # first: it may restore an --out that a killed swap had moved aside
    options.validate()
    require_free(options.out, space_needed(options), "the export")
    steps = StepLog(report)
    model = steps.run("load reference checkpoint", PPLLaVA.from_pretrained, options.checkpoint,
                      alignment_config=options.alignment_config)
    cfg = model.config
    max_frames = options.max_frames or (cfg.max_T if cfg.btadapter else 64)
    if cfg.btadapter and max_frames > cfg.max_T:
        raise PPLLaVAError(f"--max-frames {max_frames} exceeds the BT-Adapter's max_T of {cfg.max_T}")
    default_frames = min(DEFAULT_FRAMES, max_frames)
    dtype = DTYPES[options.dtype]
    export_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)

    out = options.out
    work = new_scratch(out, "partial")
    try:
        manifest = _build(options, steps, model, export_model, work, max_frames, default_frames, dtype)
        if options.verify:
            from ppllava.export.verify import verify_engine  # looked up at call time (tests patch it)

            steps.run("verify against the reference", verify_engine, work, model, options.dtype,
                      detail=lambda r: "all checks passed")
        _publish(work, out, options.force)
    except VerificationError as exc:
        # Keep what explains the failure, under a name and without a manifest, so it cannot pass
        # for an engine dir.
        failed = out.parent / f"{out.name}.failed"
        shutil.rmtree(failed, ignore_errors=True)
        if (work / MANIFEST).exists():
            (work / MANIFEST).rename(work / "manifest.failed.json")
        work.rename(failed)
        raise VerificationError(f"{exc}; the failed build (verify.json, ONNX files) is kept in {failed}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    manifest["_summary"] = steps.rows
    return manifest


# What an export has on disk at its peak (the end of the LLM build, when all of it exists at once),
# per weight element of the checkpoint (counted from the safetensors headers):
#   every weight once in the export dtype: the vision/text/pool ONNX, the LLM ONNX (the builder
#     leaves out the embedding table and keeps lm_head) and embeddings.safetensors (the table);
#   the LLM again in llm_hf/ (the checkpoint's own precision) and in the builder's scratch copy;
#   with --torch, the vision/text/pool weights once more in the torch dtype;
# plus 10% and 64 MiB for tokenizers, manifests and ONNX's per-tensor overhead. A 7B bf16
# checkpoint (14.5 GB of weights) exported in fp32 needs about 62 GB (4.3x its weight bytes),
# in fp16 46 GB (3.2x), with --llm none 18 GB (1.2x).
SPACE_MARGIN, SPACE_SLACK = 1.1, 64 * 2**20


def space_needed(options: ExportOptions) -> int:
    """Bytes the export needs free beside --out, from the checkpoint's weight headers (no weights read)."""
    llm = rest = table = 0  # elements
    for path in weight_files(options.checkpoint):
        if path.suffix != ".safetensors":  # no header to read without torch: count it as both halves, 2 bytes each
            llm += path.stat().st_size // 2
            rest += path.stat().st_size // 2
            continue
        for name, (shape, _) in safetensors_header(path).items():
            n = math.prod(shape)
            if name.startswith("language_model."):
                llm += n
                table += n if name.endswith("embed_tokens.weight") else 0
            else:
                rest += n
    e = DTYPES[options.dtype].itemsize
    hf = _source_dtype(options.checkpoint, DTYPES[options.dtype]).itemsize
    need = e * (rest + table) + hf * llm
    if options.llm == "onnx":
        need += e * llm + hf * llm
    if options.torch:
        need += ALL_DTYPES[options.torch_dtype].itemsize * rest
    return int(need * SPACE_MARGIN) + SPACE_SLACK


def _build(options, steps, model, export_model, work, max_frames, default_frames, dtype) -> dict:
    cfg = model.config
    ranges = dynamic_ranges(model, max_frames, default_frames)
    example_frames = min(4, max_frames)
    stages = {}
    for name in ("vision", "text", "pool"):
        path = work / f"{name}.onnx"
        io = steps.run(f"export {name}.onnx", export_stage, export_model, name, path, ranges, example_frames, dtype,
                       detail=lambda _, p=path: f"{p.stat().st_size / 2**20:.1f} MiB")
        files = [path] + ([path.with_suffix(".onnx.data")] if path.with_suffix(".onnx.data").exists() else [])
        stages[name] = {"file": path.name, "backend": "onnxruntime", "precision": options.dtype, **io,
                        "dynamic": {d: ranges[d] for d in _dims(io)}, "files": _files(work, files)}

    torch_records = _torch_stages(options, steps, model, work, stages, ranges, example_frames) if options.torch else []

    llm_tok = steps.run("LLM tokenizer", tokenizers.llm_tokenizer, options.checkpoint, work / "tokenizers" / "llm",
                        detail=lambda r: r.source)
    align_tok = steps.run(
        "alignment tokenizer", tokenizers.alignment_tokenizer, model.alignment.kind, options.checkpoint,
        cfg.clip_weight, options.alignment_dir, work / "tokenizers" / "alignment", detail=lambda r: r.source,
    )
    steps.run("extract LLM (Hugging Face dir)", llm_export.extract_hf_llm, model, work / "llm_hf", llm_tok.path,
              _source_dtype(options.checkpoint, dtype), options.checkpoint)
    steps.run("embedding table", llm_export.save_embeddings, model, work / "embeddings.safetensors", dtype)
    text = model.language_model.config
    if options.llm == "onnx":
        steps.run("build ONNX LLM (onnxruntime-genai)", llm_export.build_onnx_llm, work / "llm_hf", work / "llm", dtype)
        llm_files = sorted((work / "llm").iterdir())
        from ppllava.export.onnx_stages import describe_onnx

        stages["llm"] = {"dir": "llm", "backend": "onnxruntime-genai-builder", "precision": options.dtype,
                         **describe_onnx(work / "llm" / "model.onnx"),
                         "dynamic": {"sequence": {"min": 1, "opt": min(1024, text.max_position_embeddings),
                                                  "max": text.max_position_embeddings}},
                         "files": _files(work, llm_files)}

    template = choose_template(options.template, cfg.variant, llm_tok.chat_template)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": _tool_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"checkpoint": str(options.checkpoint.resolve()), "fingerprint": fingerprint(options.checkpoint)},
        "variant": cfg.variant,
        "dims": {
            "image_size": cfg.image_size, "frame_grid": list(cfg.grid), "num_patches": cfg.num_patches,
            "vision_hidden": cfg.vision["hidden_size"], "llm_hidden": cfg.llm_hidden_size,
            "vocab_size": text.vocab_size, "llm_context": text.max_position_embeddings, "max_frames": max_frames,
            "llm_layers": text.num_hidden_layers,
        },
        "preprocessing": _preprocessing(options.checkpoint, model, default_frames),
        "pooling": {
            "frame_grid": list(cfg.grid),
            "video": _plan_dict(cfg.pooling.video_plan()),
            "image": _plan_dict(cfg.pooling.image_plan()),
            "temperature": cfg.pooling.temperature,
            "image_newline": True,
        },
        "alignment": {
            "kind": model.alignment.kind,
            "max_length": model.alignment.positions,
            "padding": "max_length",
            "pad_id": 49407 if model.alignment.kind == "clip" else (align_tok.special or {}).get("pad_token_id"),
            "mask": model.alignment.kind == "clip",  # upstream's SigLIP tokenizer returns no attention mask
            "tokenizer": "tokenizers/alignment/tokenizer.json" if align_tok.path else None,
            "tokenizer_source": align_tok.source,
        },
        "llm": {
            "image_token_id": cfg.image_token_index,
            "pad_token_id": cfg.pad_token_id,
            "eos_token_ids": sorted(model.eos_token_ids),
            "template": template,
            "tokenizer": "tokenizers/llm/tokenizer.json" if llm_tok.path else None,
            "tokenizer_source": llm_tok.source,
            "embeddings": "embeddings.safetensors",
            "hf_dir": "llm_hf",
        },
        "stages": stages,
        "files": _files(work, [work / "embeddings.safetensors", *sorted((work / "tokenizers").rglob("*")),
                               *sorted((work / "llm_hf").rglob("*"))]),
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if torch_records:  # recorded the way every later artifact is
        add_variants(work, torch_records)
        manifest = json.loads((work / MANIFEST).read_text())
    return manifest


def _torch_stages(options, steps, model, work, stages, ranges, example_frames) -> list[tuple[str, dict]]:
    """Compile each stage with AOTInductor for the chosen device and dtype; recorded as the stage's
    ``torch:<dtype>`` variant, with the identity (torch version, GPU) the package is tied to."""
    from ppllava.export.torch_stages import device_identity, export_torch_stage, stage_model

    device, dtype = options.torch_device, options.torch_dtype
    source = steps.run(f"prepare stages for torch ({dtype} on {device})", stage_model, model, dtype, device)
    identity = device_identity(device)
    records = []
    for name in ("vision", "text", "pool"):
        path = work / "torch" / f"{name}.pt2"
        io = steps.run(f"compile torch/{name}.pt2 (AOTInductor, {device})", export_torch_stage, source, name, path,
                       ranges, example_frames, dtype, device,
                       detail=lambda _, p=path: f"{p.stat().st_size / 2**20:.1f} MiB")
        records.append((name, variant_record(work, path, "torch", dtype, **identity, **io,
                                             dynamic=stages[name]["dynamic"])))
    return records


def _dims(io: dict) -> set[str]:
    return {d for entry in io["inputs"] + io["outputs"] for d in entry["shape"] if isinstance(d, str)}


def _plan_dict(plan) -> dict:
    as_list = lambda v: None if v is None else list(v)  # noqa: E731
    return {"kernel": as_list(plan.kernel), "stride": as_list(plan.stride), "output_shape": as_list(plan.output_shape)}


def _source_dtype(checkpoint: Path, fallback: torch.dtype) -> torch.dtype:
    """Keep the extracted LLM in the checkpoint's own precision (bf16/fp16 releases stay small)."""
    raw = json.loads((checkpoint / "config.json").read_text())
    name = raw.get("torch_dtype") or (raw.get("text_config") or {}).get("torch_dtype")
    return ALL_DTYPES.get(name, fallback)


def _publish(work: Path, out: Path, force: bool) -> None:
    """Rename the finished directory into place; an old one (with --force) is removed only after."""
    old = None
    if out.exists():
        if not force:
            raise PPLLaVAError(f"{out} appeared during the export; not replacing it without --force")
        old = scratch_path(out, "old")
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
