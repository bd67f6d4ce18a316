"""``ppllava build-engines``: TensorRT engines from the engine dir's ONNX stages, and the
``trtllm-build`` command for the LLM, run on the target GPU.

Written against TensorRT's documented Python API (``tensorrt.Builder``, ``OnnxParser``,
``IBuilderConfig``, optimisation profiles, timing cache). The plan (what would be built, with shapes
and precision) is computed without TensorRT, so it is tested everywhere; the build itself needs
TensorRT and a GPU.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ppllava.errors import BuildError, PPLLaVAError
from ppllava.runtime.backends import STAGES
from ppllava.runtime.manifest import Manifest, add_variants, variant_key, variant_record

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8", "fp8")


@dataclass
class Profile:
    """min / opt / max shape of every input of one stage."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass
class BuildStep:
    stage: str
    onnx: Path
    plan: Path
    precision: str
    flags: list[str]
    profile: Profile
    workspace_bytes: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.stage}: {self.onnx.name} -> {self.plan.name}  precision {self.precision}  "
                 f"flags {'+'.join(self.flags)}  workspace {self.workspace_bytes / 2**30:.1f} GiB"]
        for name, (lo, opt, hi) in self.profile.shapes.items():
            lines.append(f"    {name:<16} min {list(lo)}  opt {list(opt)}  max {list(hi)}")
        lines += [f"    note: {n}" for n in self.notes]
        return "\n".join(lines)


def _profile(stage: dict, max_frames: int | None) -> Profile:
    dynamic = dict(stage.get("dynamic", {}))
    if max_frames is not None and "T" in dynamic:
        dynamic["T"] = {**dynamic["T"], "max": min(dynamic["T"]["max"], max_frames),
                        "opt": min(dynamic["T"]["opt"], max_frames)}
    shapes = {}
    for entry in stage["inputs"]:
        dims = entry["shape"]
        pick = lambda key: tuple(int(dynamic[d][key]) if isinstance(d, str) else int(d) for d in dims)  # noqa: E731
        shapes[entry["name"]] = (pick("min"), pick("opt"), pick("max"))
    return Profile(shapes)


def build_plan(engine_dir: Path, precision: str = "fp16", max_frames: int | None = None,
               workspace_gb: float = 4.0) -> list[BuildStep]:
    """What ``build-engines`` would build: one step per stage, with profiles from the manifest."""
    if precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    manifest = Manifest.load(engine_dir)
    limit = manifest.dims["max_frames"]
    if max_frames is not None and not 1 <= max_frames <= limit:
        raise BuildError(f"--max-frames must be between 1 and the export's {limit}")
    steps = []
    for name in STAGES:
        stage = manifest.stage(name)
        notes = []
        if precision == "fp16":
            onnx = manifest.stage_path(name)
            flags = ["FP16"]
        else:
            qdq = variant_key("onnxruntime", precision)
            record = manifest.stage_variant(name, qdq)
            # a record without a method predates dynamic quantization: ModelOpt's Q/DQ
            if record is None or record.get("method", "qdq") != "qdq":
                what = "no" if record is None else f"only a {record['method']}-quantized (onnxruntime CPU), not a"
                raise BuildError(
                    f"the {name} stage has {what} {precision} Q/DQ ONNX; run `ppllava quantize {engine_dir} --calib CALIB "
                    f"--stages {name} --precision {precision} --method qdq` first (it replaces the dynamic variant, "
                    "which the CPU path runs by default: quantize a copy of the engine dir for TensorRT)"
                )
            onnx = manifest.stage_path(name, qdq)
            flags = ["FP16", precision.upper()]  # explicit Q/DQ: TensorRT follows the graph's scales
            if precision == "fp8":
                notes.append("FP8 needs Ada or Hopper (compute capability >= 8.9); Jetson Orin has none")
        steps.append(BuildStep(name, onnx, engine_dir / f"{name}.{precision}.plan", precision, flags,
                               _profile(stage, max_frames), int(workspace_gb * 2**30), notes))
    return steps


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("TensorRT is not installed here: build engines on the target GPU (JetPack ships it; "
                         "datacenter: pip install tensorrt)") from None
    return trt


def gpu_identity() -> dict:
    """TensorRT version, GPU name and compute capability (the same function the runtime uses to
    refuse stale plans, so both sides always agree)."""
    _trt()
    from ppllava.runtime.backends.tensorrt import current_identity

    try:
        return current_identity()
    except PPLLaVAError as exc:
        raise BuildError(str(exc)) from None


def build_engine(step: BuildStep, timing_cache: Path) -> None:
    """Parse the ONNX, configure precision, profile and workspace, build, and write the plan."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch (flag 0); 8.x (JetPack 5/6.0) must ask for it.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(step.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {step.onnx.name}: " + " | ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, step.workspace_bytes)
    for flag in step.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in step.profile.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT rejected the optimisation profile of {step.stage}: {step.profile.shapes}")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("the timing cache %s does not match this TensorRT/GPU; starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {step.stage} (see its messages above)")
    step.plan.write_bytes(bytes(serialized))  # a new, unrecorded name (see build_engines)
    tmp = timing_cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp.replace(timing_cache)


def build_engines(engine_dir: Path, precision: str = "fp16", max_frames: int | None = None,
                  workspace_gb: float = 4.0, report=log.info) -> list[BuildStep]:
    steps = build_plan(engine_dir, precision, max_frames, workspace_gb)
    identity = gpu_identity()
    tag = os.urandom(3).hex()
    try:
        for step in steps:
            # New names: the recorded plans stay valid until the manifest points at the new ones.
            step.plan = step.plan.with_name(f"{step.plan.stem}.{tag}.plan")
            report(f"building {step.plan.name} (TensorRT {identity['tensorrt']}, {identity['gpu']})")
            build_engine(step, engine_dir / "timing.cache")
    except BaseException:
        for step in steps:
            step.plan.unlink(missing_ok=True)
        raise
    for old in _record(engine_dir, steps, identity):
        old.unlink(missing_ok=True)
    return steps


def _record(engine_dir: Path, steps: list[BuildStep], identity: dict) -> list[Path]:
    return add_variants(engine_dir, [(step.stage, variant_record(
        engine_dir, step.plan, "tensorrt", step.precision, **identity,
        profile={k: [list(s) for s in v] for k, v in step.profile.shapes.items()})) for step in steps])


# ------------------------------------------------------------------------------ TensorRT-LLM
def trtllm_build_command(engine_dir: Path, scheme: str | None, output_dir: Path, max_batch: int = 1,
                         max_question_tokens: int = 256, release: str = "current") -> list[str]:
    """``trtllm-build`` arguments from the manifest: a prompt table big enough for the visual tokens
    (max visual tokens x max batch), input/sequence limits, the GEMM plugin in the model's dtype.

    ``release="jetson-v0.12"`` targets the TensorRT-LLM v0.12 Jetson branch (JetPack 6), whose
    flags differ from current datacenter releases.
    """
    manifest = Manifest.load(engine_dir)
    if scheme is None:
        checkpoint = engine_dir / "trtllm" / "fp16"  # placeholder path for the dry run
        note = "fp16 checkpoint: convert llm_hf/ first (TensorRT-LLM's convert_checkpoint.py for the model family)"
    else:
        entry = manifest.stage_variant("llm", variant_key("tensorrt-llm", scheme, "checkpoint"))
        if entry is None:
            raise BuildError(f"no {scheme} TensorRT-LLM checkpoint; run `ppllava quantize --llm {scheme}` first")
        if entry.get("below_threshold"):
            log.warning("the %s checkpoint was recorded below its accuracy threshold (see quant.json)", scheme)
        checkpoint = manifest.path(entry)
        note = None
    # The pool stage can emit up to K_max tokens (any --tokens budget), so the table must hold that.
    max_visual = int(manifest.stage("pool")["dynamic"]["K"]["max"])
    context = int(manifest.dims["llm_context"])
    max_input = min(context - 1, max_visual + max_question_tokens)  # leave room to generate
    args = [
        "trtllm-build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(output_dir),
        "--max_batch_size", str(max_batch), "--max_input_len", str(max_input), "--max_seq_len", str(context),
        "--max_prompt_embedding_table_size", str(max_visual * max_batch),
    ]
    if release == "jetson-v0.12":
        args += ["--gemm_plugin", "float16", "--gpt_attention_plugin", "float16", "--remove_input_padding", "enable"]
    elif release == "current":
        args += ["--gemm_plugin", "auto"]
    else:
        raise BuildError(f"release must be 'current' or 'jetson-v0.12', got {release!r}")
    if note:
        log.warning(note)
    return args


def run_trtllm_build(engine_dir: Path, scheme: str, command: list[str], report=log.info) -> Path:
    """Run trtllm-build into a scratch dir beside the engine dir (stale ones of killed runs swept
    first), then move the engine in and record it in the manifest."""
    import subprocess

    from ppllava.runtime.scratch import require_free, scratch_dir, sweep, tree_bytes

    sweep(engine_dir, report)
    checkpoint = Path(command[command.index("--checkpoint_dir") + 1]) if "--checkpoint_dir" in command else None
    if checkpoint is not None and checkpoint.is_dir():  # the engine holds the checkpoint's weights, about as big
        require_free(engine_dir, int(1.1 * tree_bytes(checkpoint)), "trtllm-build")
    with scratch_dir(engine_dir, "trtllm") as scratch:
        out = scratch / "engine"
        (scratch / "tmp").mkdir()
        args = list(command)
        args[args.index("--output_dir") + 1] = str(out)
        report("$ " + format_command(args))
        try:  # its temporary files beside the engine too, never the system temp dir
            result = subprocess.run(args, env={**os.environ, "TMPDIR": str(scratch / "tmp")})
        except FileNotFoundError:
            raise BuildError("trtllm-build is not on PATH: install TensorRT-LLM on this GPU machine") from None
        if result.returncode != 0:
            raise BuildError(f"trtllm-build failed with exit code {result.returncode} (its output is above)")
        target = engine_dir / f"trtllm_engine.{os.urandom(3).hex()}"
        out.rename(target)
    # One built LLM engine at a time: a build for another scheme replaces it too.
    record = variant_record(engine_dir, target, "tensorrt-llm", scheme, **gpu_identity())
    superseded = add_variants(engine_dir, [("llm", record)],
                              drop=lambda stage, old: old.get("backend") == "tensorrt-llm" and not old.get("kind"))
    for old in superseded:
        shutil.rmtree(old, ignore_errors=True)
    return target


def max_visual_tokens(manifest: Manifest) -> int:
    """Visual tokens of the largest clip the engine accepts under its default pooling plan."""
    T = int(manifest.dims["max_frames"])
    for frames in range(T, 0, -1):
        try:
            out = manifest.plan("video").output_grid((frames, *manifest.grid))
            return out[0] * out[1] * out[2]
        except ValueError:
            continue
    out = manifest.plan("image").output_grid((1, *manifest.grid))
    return out[0] * out[1] * out[2] + 1


def format_command(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
