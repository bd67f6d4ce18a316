"""``ppllava doctor``: which backends are usable here, and whether an engine dir fits this machine
(and the Jetson devices), by an estimate of what one ``ppllava ask`` holds in memory at its peak.

The estimate counts what the chosen backend and precision load, nothing else: the artifacts its
stages and its LLM open (an engine dir also carries files the run never reads: ``llm_hf/`` for the
onnxruntime path, the FP stages once a quantized variant is chosen), the rows of the memory-mapped
embedding table a conversation can touch, the activations the stages keep, the KV cache at the
full context, and the runtime itself (measured in a child process). Every term is in
``MemoryEstimate``; the formulas and the measurements behind their constants are next to them.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppllava.errors import BackendError, InputError

JETSONS = {"Jetson Orin Nano 8 GB": 8, "Jetson Orin NX 16 GB": 16, "Jetson AGX Orin 64 GB": 64}
USABLE_FRACTION = 0.7  # Jetson memory is shared with the OS and the video decoder
# Text positions of one question besides the visual tokens (system prompt, template, a question of
# some 40 words): what the LLM prefills with the visual tokens.
PROMPT_TEXT_TOKENS = 64
# A read fault on a mapped file maps this much around the page (the kernel's fault_around_bytes
# default), so each embedding row looked up makes up to 64 KiB of the table resident.
FAULT_AROUND_BYTES = 64 * 2**10
ACTIVATION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # the manifest's recorded I/O dtypes
# The libraries each backend imports when it opens an engine (their import cost is part of the
# runtime's; those not installed here are skipped: `backends()` says so).
LIBRARIES = {"onnxruntime": ("onnxruntime",), "tensorrt": ("tensorrt", "polygraphy", "onnxruntime"),
             "tensorrt-llm": ("tensorrt", "polygraphy", "tensorrt_llm"), "torch": ("torch", "transformers")}


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


# ------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class DoctorOptions:
    """What to size: the backend and ``--precision`` that will run, and the frames per video
    (None: the most the backend's vision stage takes)."""

    backend: str = "onnxruntime"
    precision: str | None = None
    frames: int | None = None

    def __post_init__(self):
        if self.frames is not None and (isinstance(self.frames, bool) or not isinstance(self.frames, int)
                                        or self.frames < 1):
            raise InputError(f"--frames must be >= 1, got {self.frames}")


@dataclass
class MemoryEstimate:
    """Bytes at the peak of one ``ask`` whose answer runs to the end of the context."""

    frames: int
    context: int  # KV-cache positions (the LLM's full context)
    prefill_tokens: int
    weights: dict[str, int] = field(default_factory=dict)  # stage -> bytes of the artifact files it opens
    embeddings: int = 0  # resident part of the memory-mapped token-embedding table
    activations: dict[str, int] = field(default_factory=dict)  # vision / pool / prefill working memory
    kv_cache: int = 0
    runtime: int = 0  # the interpreter, the libraries' code and state, the tokenizers: measured (runtime_bytes)

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.embeddings + sum(self.activations.values()) + self.kv_cache + self.runtime


def _files_bytes(record: dict, only=lambda rel: True) -> int:
    return sum(f["bytes"] for rel, f in record.get("files", {}).items() if only(rel))


def _llm_config(manifest) -> dict | None:
    """The LLM's shape: layers, attention and KV heads, head size, hidden size, vocabulary and
    context, from the ONNX LLM's genai_config.json, or from ``llm_hf/config.json`` in an engine
    exported without one (--llm none: the torch and TensorRT-LLM backends' LLM)."""
    if manifest.exported("llm"):
        config = json.loads((manifest.stage_path("llm") / "genai_config.json").read_text())["model"]
        dec = config["decoder"]
        return {"layers": dec["num_hidden_layers"], "heads": dec["num_attention_heads"],
                "kv_heads": dec["num_key_value_heads"], "head_size": dec["head_size"],
                "hidden": dec["hidden_size"], "vocab": config["vocab_size"], "context": config["context_length"],
                "filename": dec.get("filename", "model.onnx")}
    hf_dir = manifest.data["llm"].get("hf_dir")
    if not hf_dir or not (manifest.root / hf_dir / "config.json").is_file():
        return None
    hf = json.loads((manifest.root / hf_dir / "config.json").read_text())
    heads = hf["num_attention_heads"]
    return {"layers": hf["num_hidden_layers"], "heads": heads, "kv_heads": hf.get("num_key_value_heads", heads),
            "head_size": hf.get("head_dim") or hf["hidden_size"] // heads, "hidden": hf["hidden_size"],
            "vocab": hf["vocab_size"], "context": int(manifest.dims["llm_context"]), "filename": None}


def _llm_io_bytes(record: dict) -> int:
    """Bytes per element of the LLM graph's KV cache and logits: the recorded past_key_values dtype;
    the weight-only int4/int8 variants (``ppllava quantize --llm ort_*``) record none and are built
    with float32 I/O."""
    for spec in record.get("inputs", []):
        if spec["name"].startswith("past_key_values"):
            return DTYPE_BYTES.get(spec["dtype"], 4)
    return 4


def _llm_loaded(manifest, backend, config):
    """(weight bytes, KV/logit element bytes) of the LLM the backend's decoder loads
    (``backend.llm_artifact()``), by what that artifact is: an ONNX graph (its decoder graph and
    external data, not the tokenizer copies beside it), a TensorRT-LLM engine (its files, fp16 KV and
    logits) or ``llm_hf/`` loaded by torch in the stages' dtype."""
    from ppllava.runtime.tensors import map_safetensors

    record = backend.llm_artifact()
    if record is None:
        return None
    if record.get("backend") == "torch":
        itemsize = ACTIVATION_BYTES.get(record["precision"], 4)
        hf_dir = manifest.path(record)
        elements = sum(a.size for f in sorted(hf_dir.glob("*.safetensors")) for a in map_safetensors(f).values())
        return elements * itemsize, itemsize
    if record.get("backend") == "tensorrt-llm":
        return _files_bytes(record), 2
    graph = config["filename"]
    return _files_bytes(record, lambda rel: Path(rel).name in (graph, graph + ".data")), _llm_io_bytes(record)


def _mlp_width(manifest, config) -> int:
    """The LLM's MLP width (genai_config does not record it), from the FP ONNX LLM's parameter
    count: layers x (attention + 3 x hidden x width) + the LM head. Exact for the SwiGLU families
    (Llama, Qwen2, SmolLM2) up to norms and biases; 8/3 x hidden (Llama's ratio) without an ONNX LLM."""
    d, layers = config["hidden"], config["layers"]
    if not manifest.exported("llm"):
        return 8 * d // 3
    record = manifest.stage("llm")
    graph = config["filename"]
    params = _files_bytes(record, lambda rel: Path(rel).name in (graph, graph + ".data")) // _llm_io_bytes(record)
    attention = 2 * d * config["heads"] * config["head_size"] + 2 * d * config["kv_heads"] * config["head_size"]
    return max(1, (params - config["vocab"] * d - layers * attention) // (3 * d * layers))


def _vision_activations(manifest, frames: int, itemsize: int) -> int:
    """The vision stage's working memory at ``frames``, plus its (T, N, C) output, which the
    in-memory feature cache keeps.

    onnxruntime's CPU arena keeps, per token of every frame, the live set of the attention phase
    (2 (heads, n, n) score tensors + 2 hidden states: 2·h·n + 2·C) and that of the MLP phase
    (3 (n, 4C) tensors + 2 hidden: 3·I + 2·C) at once (chunks of different sizes, not reused for each
    other), plus the BT-Adapter's own residual stream and its temporaries (4·C). The per-phase live
    sets come from a liveness pass over the exported graph. Measured (first run, output included):
    the small preset's stage (C 384, 257 tokens, 32 frames) 338 MiB, 350 by this; two plain CLIP
    towers without a BT-Adapter (C 128 at 577 tokens; C 256 with an 8C MLP) 324 and 282 MiB, 352 and
    330 by this with their true heads and widths. The manifest records tokens and width, not heads or
    MLP width: ViT conventions are taken (head size 64, MLP 4C: exact for CLIP-L and the presets, up
    to 12% high for SigLIP-so400m's 16 heads of 72)."""
    n, c = int(manifest.dims["num_patches"]) + 1, int(manifest.dims["vision_hidden"])  # + CLS
    heads, width = max(1, c // 64), 4 * c
    per_token = 2 * heads * n + 3 * width + 8 * c
    features = frames * (n - 1) * c * itemsize
    return frames * n * per_token * itemsize + features


def memory_estimate(engine_dir: Path, options: DoctorOptions = DoctorOptions(),
                    runtime: int | None = None) -> MemoryEstimate:
    """What ``options.backend`` at ``options.precision`` holds at the peak of one ask at
    ``options.frames`` whose answer fills the context. ``runtime``: bytes of the runtime itself
    (None: measured now in a child process, ``runtime_bytes``)."""
    from ppllava.runtime.backends import STAGES, BackendOptions, get_backend
    from ppllava.runtime.manifest import Manifest

    backend_class = get_backend(options.backend)  # refuses an unknown name
    manifest = Manifest.load(engine_dir, check_files=False)
    # The backend's own choice of artifacts (and its refusal of a missing variant); no session is opened.
    backend = backend_class(manifest, BackendOptions(precision=options.precision))
    frames = options.frames or int(backend.max_frames)
    if frames > backend.max_frames:
        raise InputError(f"--frames {frames} exceeds this engine's maximum of {backend.max_frames} (export --max-frames)")
    itemsize = ACTIVATION_BYTES.get(backend.compute_dtype) or ACTIVATION_BYTES.get(
        manifest.stage("vision").get("precision"), 4)  # int8 Q/DQ graphs compute in their float dtype between
    grid = (frames, *manifest.grid)
    try:
        visual = int(np.prod(manifest.plan("video").output_grid(grid)))
    except ValueError as exc:  # as `ask` refuses it
        raise InputError(f"cannot pool {frames} frame(s): {exc}") from None
    config = _llm_config(manifest)
    loaded = _llm_loaded(manifest, backend, config) if config else None
    context = int(config["context"]) if loaded else 0  # no LLM (exported with --llm none): none of its terms
    prefill = min(visual + PROMPT_TEXT_TOKENS, context)
    est = MemoryEstimate(frames=frames, context=context, prefill_tokens=prefill)
    for stage in STAGES:
        est.weights[stage] = _files_bytes(backend.artifact(stage))
    vision_bytes = _vision_activations(manifest, frames, itemsize)
    # the pool stage: the projection to the LLM width over every token of every frame, its bias add
    # and the gathered windows, (T·N, D) each (small preset, 32 frames: 51 MiB kept, 48 by this)
    pool_bytes = 3 * frames * int(manifest.dims["num_patches"]) * int(manifest.dims["llm_hidden"]) * itemsize
    est.activations = {"vision": vision_bytes, "pool": pool_bytes}
    if loaded:
        weights, io = loaded
        est.weights["llm"] = weights
        # Prefill: the logits of every position (V each, handed out of the arena) and the SwiGLU MLP's
        # temporaries, kept twice by the arena (2 x 4 of width I). Measured per prefill token beyond its KV
        # entry: SmolLM2-135M (V 49153, I 1536) 242 KiB, 240 by this; small preset (V 32064, I 1408) 175, 169.
        est.activations["prefill"] = prefill * (config["vocab"] * io + 8 * _mlp_width(manifest, config) * io)
        # The KV cache is allocated for the request, but only the positions written become resident:
        # at the end of the context, all of them.
        est.kv_cache = context * config["layers"] * 2 * config["kv_heads"] * config["head_size"] * io
        table = manifest.root / manifest.data["llm"]["embeddings"]
        table_bytes = table.stat().st_size if table.is_file() else 0
        rows = min(config["vocab"], max(0, context - visual))  # the text positions of a full context, at most
        est.embeddings = min(table_bytes, rows * max(table_bytes // config["vocab"], FAULT_AROUND_BYTES))
    est.runtime = runtime_bytes(engine_dir, options.backend, options.precision) if runtime is None else runtime
    return est


def _status(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


def probe_runtime(engine_dir: str, backend: str, precision: str = "", *libraries: str) -> None:
    """The child process of ``runtime_bytes``: what ``ask`` does apart from its data, in its order
    (the allocator reuses what an earlier step freed, so the order matters): import what ``ask``
    imports, open the backend's stage sessions (the libraries' code and per-session state), load the
    tokenizers, decode a short clip (OpenCV's codec libraries). Writes {"resident": VmRSS,
    "stage_weights": bytes of the stages' files} as one JSON line."""
    import importlib
    import tempfile

    import cv2

    import ppllava.cli
    import ppllava.runtime.cli
    import ppllava.runtime.pipeline  # noqa: F401  (these three: what `ppllava ask` imports)
    from ppllava.runtime.backends import STAGES, BackendOptions, get_backend
    from ppllava.runtime.manifest import Manifest
    from ppllava.runtime.prompt import Tokenizers
    from ppllava.runtime.video import load_clip

    backend_class = get_backend(backend)
    for name in libraries:
        importlib.import_module(name)
    manifest = Manifest.load(engine_dir, check_files=False)
    opened = backend_class(manifest, BackendOptions(precision=precision or None))
    stages = opened.open_stages()
    weights = sum(_files_bytes(opened.artifact(n)) for n in STAGES)
    tokenizers = Tokenizers(manifest.root, manifest.data)
    tokenizers.require()
    tokenizers.prompt_ids([("What happens in this video?", None)])
    tokenizers.alignment_ids("What happens in this video?")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "probe.mp4"
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
        for i in range(8):
            writer.write(np.full((48, 64, 3), 30 * i, np.uint8))
        writer.release()
        load_clip(clip, 4, int(manifest.data["preprocessing"]["size"]))
    sys.stdout.write(json.dumps({"resident": _status("VmRSS"), "stage_weights": weights}) + "\n")
    for stage in stages.values():
        stage.close()


def runtime_bytes(engine_dir: Path, backend: str, precision: str | None = None) -> int:
    """The fixed part of every run, measured here (it differs by platform and wheel; 120-190 MiB on
    x86): the resident size of a fresh Python doing what ``ask`` does apart from its data
    (``probe_runtime``), less the stages' weights (counted apart): the interpreter, the libraries'
    code that runs, their per-session state, the tokenizers."""
    libraries = [m for m in LIBRARIES.get(backend, ()) if importlib.util.find_spec(m) is not None]
    code = "import sys; from ppllava.runtime.doctor import probe_runtime; probe_runtime(*sys.argv[1:])"
    try:
        out = subprocess.run([sys.executable, "-c", code, str(engine_dir), backend, precision or "", *libraries],
                             capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"could not measure the runtime's own memory: {exc}") from None
    try:
        probe = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"could not measure the runtime's own memory (a fresh Python doing what `ask` does "
                           f"failed: {last})") from None
    return max(0, probe["resident"] - probe["stage_weights"])


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def report(engine_dir: Path | None, options: DoctorOptions = DoctorOptions()) -> list[str]:
    lines = [f"{name:<18} {status}" for name, status in backends()]
    if engine_dir is None:
        return lines
    est = memory_estimate(engine_dir, options)
    gib = lambda b: b / 2**30  # noqa: E731
    act = est.activations
    weights = ", ".join(f"{k} {gib(v):.2f}" for k, v in est.weights.items())
    kv = f"full context of {est.context} tokens" if est.context else "no LLM in this engine dir"
    libraries = ", ".join(LIBRARIES[options.backend])
    lines += [
        (f"\nengine {engine_dir} on {options.backend} ({options.precision or 'as exported'}), {est.frames} frames: "
         f"needs about {gib(est.total):.2f} GiB at the peak of one answer that fills the context"),
        f"  weights            {gib(sum(est.weights.values())):.2f} GiB ({weights}; the files the backend opens)",
        f"  embedding rows     {gib(est.embeddings):.2f} GiB (memory-mapped; the rows {est.context} positions can touch)",
        (f"  activations        {gib(sum(act.values())):.2f} GiB (vision at {est.frames} frames {gib(act['vision']):.2f}, "
         f"pool {gib(act['pool']):.2f}, LLM prefill of {est.prefill_tokens} tokens {gib(act.get('prefill', 0)):.2f})"),
        f"  KV cache           {gib(est.kv_cache):.2f} GiB ({kv})",
        f"  runtime            {gib(est.runtime):.2f} GiB (python, opencv, {libraries}, the tokenizers: measured here)",
    ]
    free = available_bytes()
    if free is not None:
        verdict = "fits" if est.total <= free else "does NOT fit"
        lines.append(f"  {'this machine':<24} {verdict} ({gib(free):.1f} GiB available now)")
    for device, total in JETSONS.items():
        usable = total * USABLE_FRACTION
        verdict = "fits" if gib(est.total) <= usable else "does NOT fit"
        lines.append(f"  {device:<24} {verdict} ({usable:.1f} GiB usable)")
    return lines
