#!/usr/bin/env python3
"""GPU kit: the torch backend on a lent GPU, at a real model's shapes, measured against Hugging Face
eager in one run, into one JSON.

What it does, in order (each phase is timed, and the JSON is rewritten after each one, so a run cut
short still leaves what it measured):

1. checks the imports it needs and names any wheel that must be carried, and the free disk space
   (one line, exit 2);
2. measures the device's memory bandwidth (a large device-to-device copy) for the decode floor;
   then, on a GPU (or with ``--toolchain-check on``), compiles and runs a one-layer model with
   AOTInductor (~35 s), so a missing CUDA toolkit, Triton or Python headers show in the first minute
   instead of minutes into the export (exit 2; the JSON's ``toolchain`` says what was found);
3. writes a random-weight checkpoint of ``--preset`` (``ppllava.presets``; weights drawn on the
   device, a second where numpy's portable generator takes minutes at 7B);
4. exports it for the torch backend (``ppllava.export``: AOTInductor stages compiled for the device,
   ``llm_hf/`` for the static-cache decoder; the export's own verification is skipped, since at 7B it
   runs the fp32 reference on the CPU for minutes: step 6 checks the tokens instead);
5. runs ``ppllava bench``'s own measurement (``bench_pipeline`` for the torch backend, ``bench_torch``
   for Hugging Face eager, ``report`` for the ratios): time to first token, ms/token, end to end,
   peak device memory, on synthetic frames (no video decoder needed);
6. checks greedy tokens against eager: identical, or else the top-1 agreement of the backend along
   eager's tokens (teacher forcing) against the export's own threshold (``ppllava.thresholds``);
7. puts ms/token beside its floor: the LLM's weight bytes (read once per token) plus its KV cache at
   the mean decode position / the measured bandwidth, and / the vendor's nominal one where known.

``--build-only`` stops after step 4, keeping ``--work``; a second run with the same ``--work``
reuses the checkpoint and engine and measures. That is the plan for the lent GPU (two calls, each
well inside one call's 10-minute limit, the machine held warm between them).

On the lent H200 (its image as it is: Python 3.12, torch 2.11+cu130, transformers 5.17, onnx,
onnxscript, pillow; nothing to download). One wheel must be carried: open_clip_torch, for the CLIP
vocabulary file that the export builds the alignment tokenizer from (never imported). Fetch it here
once, into an ignored folder::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl open_clip_torch==3.3.0

then, with ``carry: [".whl"]`` and ``timeout_s`` 600, two device commands (each phase's time lands
in the JSON; not yet run on a GPU). First the build (the checkpoint and the AOTInductor export)::

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --target .kit/site .whl/*.whl &&
    PYTHONPATH=.kit/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kit.py --work .kit/work --build-only \
        --out $OUT/gpu_kit_build.json 2>&1 | tee $OUT/gpu_kit_build.log

then, while the machine is still warm (ignored paths of the repo copy, ``.kit/`` here, are kept
between calls), the measurement::

    set -o pipefail; PYTHONPATH=.kit/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kit.py --work .kit/work \
        --out $OUT/gpu_kit.json 2>&1 | tee $OUT/gpu_kit.log

The repo copied there is not installed: this script maps ``ppllava.export`` / ``.runtime`` /
``.calibration`` to their folders itself, as ``pyproject.toml``'s package-dir does.

Rehearsal on a CPU, at the small preset, in the venv that mirrors the device's versions (CI runs it
in .ci/tf5.sh)::

    .venv-tf5/bin/python benchmarks/gpu_kit.py --preset small --device cpu --work /tmp/kit --build-only \\
        --toolchain-check on --out /tmp/gpu_kit_build.json
    .venv-tf5/bin/python benchmarks/gpu_kit.py --preset small --device cpu --work /tmp/kit --max-new-tokens 16 \\
        --repeat 1 --warmup 0 --questions 1 --out /tmp/gpu_kit_rehearsal.json && rm -rf /tmp/kit

Exit status: 0 when every phase ran and the tokens agree, 1 when a phase failed or the tokens
disagree (the JSON says which), 2 when something it needs is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Vendor datasheet memory bandwidth, GB/s (device/H200.md); a GPU not listed gets the measured floor only.
NOMINAL_GBS = {"NVIDIA H200": 4800.0}  # matched by prefix: "NVIDIA H200 NVL" too
# (module, distribution, why it is needed): checked before anything runs
NEEDS = (
    ("torch", "torch", "the reference, the torch backend and AOTInductor"),
    ("transformers", "transformers", "the reference's CLIP / Llama blocks and the backend's LLM"),
    ("numpy", "numpy", "everything"),
    ("safetensors", "safetensors", "checkpoint and llm_hf/ weights"),
    ("tokenizers", "tokenizers", "the engine's tokenizers"),
    ("onnx", "onnx", "the export writes the ONNX stages too"),
    ("onnxscript", "onnxscript", "torch.onnx's exporter"),
    ("PIL", "pillow", "resizing the synthetic frames"),
    ("open_clip", "open_clip_torch", "its CLIP vocabulary file (the package is never imported)"),
)


T0 = time.perf_counter()


def log(line: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ before anything runs
def missing_needs(device: str) -> list[str]:
    """One 'module (distribution: why)' entry per missing need; a C++ compiler (AOTInductor) and,
    on a GPU, Triton too."""
    missing = [f"{module} ({dist}: {why})" for module, dist, why in NEEDS if importlib.util.find_spec(module) is None]
    if not (shutil.which("g++") or shutil.which("c++")):
        missing.append("a C++ compiler (g++ or c++ on PATH: AOTInductor compiles the stages with it)")
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        missing.append("triton (triton: AOTInductor's CUDA kernels)")
    return missing


def toolchain(torch, device: str, found: dict) -> dict:
    """What AOTInductor will compile with, into ``found`` first (so the JSON has it when the compile
    fails), then a one-layer model compiled for ``device``, loaded and checked against eager; raises
    with the compiler's first line."""
    import sysconfig

    from torch.utils import cpp_extension

    found.update(cxx=shutil.which("g++") or shutil.which("c++"),
                 python_h=Path(sysconfig.get_paths()["include"], "Python.h").is_file())
    if device == "cuda":
        found.update(cuda_home=cpp_extension.CUDA_HOME, nvcc=shutil.which("nvcc"),
                     triton=getattr(importlib.import_module("triton"), "__version__", None))
    layer = torch.nn.Linear(64, 64).to(device).eval()
    x = torch.randn(4, 64, device=device)
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        program = torch.export.export(layer, (x,))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(scratch, "smoke.pt2")))
        got = torch._inductor.aoti_load_package(package)(x)
        found["max_abs_error"] = float((got - layer(x)).abs().max())
    if not found["max_abs_error"] <= 1e-3:
        raise RuntimeError(f"the AOTInductor-compiled layer disagrees with eager by {found['max_abs_error']:.3g}")
    return found


def free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**30


def built(work: Path, preset: str) -> bool:
    """Whether ``work`` holds the engine of an earlier (--build-only) run."""
    return (work / f"{preset}-engine-torch" / "manifest.json").is_file()


def import_ppllava() -> str:
    """Make ``ppllava`` and its three mapped subpackages importable from this checkout; returns how."""
    sys.path.insert(0, str(REPO))
    import ppllava

    if Path(ppllava.__file__).resolve().parent != REPO / "ppllava":
        return f"installed at {Path(ppllava.__file__).parent}"  # e.g. an editable install elsewhere: use it
    if importlib.util.find_spec("ppllava.export") is not None:
        return "installed (editable)"
    for name in ("runtime", "calibration", "export"):  # runtime first: the others import it
        spec = importlib.util.spec_from_file_location(f"ppllava.{name}", REPO / name / "__init__.py",
                                                      submodule_search_locations=[str(REPO / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(ppllava, name, module)
    return "mapped from the source tree"


# ------------------------------------------------------------------ measurements
def memory_bandwidth(torch, device: str, mib: int) -> dict:
    """Copy bandwidth in GB/s (bytes read + written), best and median of timed device copies."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 3:  # warm-up copies are discarded
            times.append(seconds)
    times.sort()
    del src, dst
    return {"method": f"torch copy_ of {mib} MiB on {device}, bytes read + written, 10 timed after 3 warm-ups",
            "best_gbs": 2 * n / times[0] / 1e9, "median_gbs": 2 * n / times[len(times) // 2] / 1e9}


def mean_position(data: dict, options) -> int:
    """The mean length of the cache over the first question's decode steps (the prefill made the
    first token; step k reads prompt + k positions, k = 0 .. new - 2)."""
    if not data.get("prompt_tokens"):
        raise ValueError("the bench report has no prompt length (prompt_tokens)")
    return int(data["prompt_tokens"]) + max(0, options.max_new_tokens - 2) // 2


def decode_bytes(engine: Path, element_bytes: int, position: int = 0) -> dict:
    """What one decode step must read at least: every LLM weight once (the input embedding table
    only one row; with tied embeddings it is read whole as lm_head), in the precision that runs, and
    the keys and values of ``position`` cached tokens (what a cache sized for more also holds is not
    a floor's: reading it is the implementation's cost)."""
    from ppllava.checkpoint import safetensors_header, weight_files

    hf_dir = engine / "llm_hf"
    config = json.loads((hf_dir / "config.json").read_text())
    total = table = 0
    for path in weight_files(hf_dir):
        for name, (shape, _) in safetensors_header(path).items():
            count = 1
            for d in shape:
                count *= d
            total += count
            table += count if name.endswith("embed_tokens.weight") else 0
    hidden = int(config["hidden_size"])
    read = total - (0 if config.get("tie_word_embeddings") else table - hidden)
    heads = int(config["num_attention_heads"])
    kv_heads, head_dim = int(config.get("num_key_value_heads") or heads), int(config.get("head_dim") or hidden // heads)
    kv = 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * position * element_bytes
    return {"weight_bytes": read * element_bytes, "kv_cache_bytes": kv, "kv_positions": position,
            "floor_bytes": read * element_bytes + kv, "parameters": total, "element_bytes": element_bytes}


def greedy_check(pipe, options, eager_tokens: list[int], backend_tokens: list[int]) -> dict:
    """Identical tokens, or else the backend's top-1 agreement along eager's tokens (teacher forced)
    on bench's own first-question inputs, judged by the export's threshold below fp32."""
    from ppllava.runtime.bench import QUESTIONS, synthetic_frames
    from ppllava.runtime.preprocess import normalise
    from ppllava.runtime.video import resize_frames
    from ppllava.thresholds import E2E_TOP1_MIN

    shorter = min(len(eager_tokens), len(backend_tokens))
    first_difference = next((i for i, (a, b) in enumerate(zip(eager_tokens, backend_tokens)) if a != b),
                            None if len(eager_tokens) == len(backend_tokens) else shorter)
    out = {"eager": eager_tokens, "backend": backend_tokens, "identical": first_difference is None,
           "first_difference_at": first_difference, "top1_min": E2E_TOP1_MIN}
    spec = pipe.manifest.data["preprocessing"]
    frames = resize_frames(synthetic_frames(options.synthetic_frames, seed=options.seed), int(spec["size"]))
    pixels = normalise(frames, spec)
    clip_ids, clip_mask = pipe.tokenizers.alignment_ids(QUESTIONS[0])
    input_ids = pipe.tokenizers.prompt_ids([(QUESTIONS[0], None)])
    chosen = pipe.forced_choices(pixels, clip_ids, input_ids, eager_tokens, clip_mask)
    agreement = sum(a == b for a, b in zip(chosen, eager_tokens)) / max(len(eager_tokens), 1)
    out.update(top1_agreement=round(agreement, 4),
               verdict="identical" if out["identical"] else "agree" if agreement >= E2E_TOP1_MIN else "disagree")
    return out


def summary(data: dict, bandwidth: dict, weights: dict, device_name: str, greedy: dict) -> dict:
    backends = data["backends"]
    torch_b, eager_b = backends["torch"]["first_question"], backends["torch-eager"]["first_question"]

    def median(block, key):
        return (block.get(key) or {}).get("median")

    ms_token = median(torch_b, "decode_ms_per_token")
    floor_measured = weights["floor_bytes"] / (bandwidth["best_gbs"] * 1e9) * 1e3
    nominal = next((gbs for name, gbs in NOMINAL_GBS.items() if device_name.startswith(name)), None)
    floor_nominal = weights["floor_bytes"] / (nominal * 1e9) * 1e3 if nominal else None
    return {
        "time_to_first_token_ms": {"torch": median(torch_b, "time_to_first_token_ms"),
                                   "eager": median(eager_b, "time_to_first_token_ms")},
        "decode_ms_per_token": {"torch": ms_token, "eager": median(eager_b, "decode_ms_per_token")},
        "decode_floor_ms_per_token": {"measured_bandwidth": floor_measured, "nominal_bandwidth": floor_nominal,
                                      "nominal_gbs": nominal},
        "decode_vs_floor": {"measured": ms_token / floor_measured if ms_token else None,
                            "nominal": ms_token / floor_nominal if ms_token and floor_nominal else None},
        "end_to_end_ms": {"torch": median(torch_b, "end_to_end_ms"), "eager": median(eager_b, "end_to_end_ms")},
        "speedup_vs_eager": {k: data["ratios"].get(k)
                             for k in ("time_to_first_token", "decode_ms_per_token", "end_to_end")},
        "peak_device_mib": {"torch": backends["torch"].get("peak_device_mib"),
                            "eager": backends["torch-eager"].get("peak_device_mib")},
        "peak_host_mib": {"torch": backends["torch"].get("peak_host_mib"),
                          "eager": backends["torch-eager"].get("peak_host_mib")},
        "greedy": greedy["verdict"], "top1_agreement": greedy["top1_agreement"],
    }


# ------------------------------------------------------------------ the run
class Kit:
    """The phases and the one JSON they fill; written again after every phase."""

    def __init__(self, args):
        self.args = args
        self.data: dict = {"kit": "benchmarks/gpu_kit.py", "argv": sys.argv[1:], "phases": {}}

    def write(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - T0, 1)
        from ppllava.runtime.manifest import write_json_atomic

        write_json_atomic(self.args.out, self.data, default=str)

    def phase(self, label: str, fn, /, *args, **kwargs):
        log(f"{label} ...")
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.data["phases"][label] = {"s": round(time.perf_counter() - t0, 1),
                                          "error": f"{type(exc).__name__}: {first}",
                                          "traceback": traceback.format_exc().splitlines()[-25:]}
            self.write()
            raise SystemExit(f"gpu_kit: {label} failed: {type(exc).__name__}: {first} (details in {self.args.out})")
        self.data["phases"][label] = {"s": round(time.perf_counter() - t0, 1)}
        log(f"{label} done in {time.perf_counter() - t0:.1f} s")
        self.write()
        return result


def run(args) -> int:
    missing = missing_needs(args.device)
    if missing:
        print(f"gpu_kit: missing {'; '.join(missing)}. Carry the wheels (this script's docstring says how) "
              "or install them, then run again.", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="ppllava-gpu-kit-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Checked only before anything is written: a resumed build's checkpoint already holds its share.
    started = built(work, args.preset) or (work / f"{args.preset}-checkpoint" / "config.json").is_file()
    need = args.min_free_gib if args.min_free_gib is not None else (2.0 if args.preset == "small" else 40.0)
    if not started and free_gib(work) < need:
        print(f"gpu_kit: {work} has {free_gib(work):.1f} GiB free; the {args.preset} checkpoint, engine and "
              f"compile cache need about {need:g} GiB (--work elsewhere, or --min-free-gib)", file=sys.stderr)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 2
    # AOTInductor's compile cache (about 1 GB for the small preset) goes with the engine it builds,
    # so a run leaves nothing in /tmp/torchinductor_<user>; set before torch is imported (its first
    # look at the variable fixes it), and only where the user has not chosen one.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    try:
        return run_in(args, work)
    finally:  # a failed phase too: the 7B preset's engine is tens of GB
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run_in(args, work: Path) -> int:
    kit = Kit(args)
    kit.data["ppllava"] = import_ppllava()
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kit: --device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    from ppllava.export.bench_torch import bench_torch
    from ppllava.export.engine import ExportOptions, export_engine
    from ppllava.presets import PRESETS, build_random_checkpoint
    from ppllava.runtime import bench
    from ppllava.runtime.pipeline import Pipeline

    if args.preset not in PRESETS:
        print(f"gpu_kit: unknown --preset {args.preset!r} (known: {', '.join(PRESETS)})", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    kit.data["machine"] = {"device": device_name, "python": sys.version.split()[0], "torch": torch.__version__,
                           "transformers": transformers.__version__, "cpu_count": os.cpu_count()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        kit.data["machine"].update(compute_capability=f"{props.major}.{props.minor}",
                                   memory_gib=round(props.total_memory / 2**30, 1))
    if args.threads:
        torch.set_num_threads(args.threads)
    kit.write()

    mib = args.copy_mib or (4096 if args.device == "cuda" else 256)
    kit.data["bandwidth"] = kit.phase("bandwidth", memory_bandwidth, torch, args.device, mib)
    check = args.toolchain_check == "on" or (args.toolchain_check == "auto" and args.device == "cuda")
    if check and not built(work, args.preset):
        try:
            kit.phase("toolchain", toolchain, torch, args.device, kit.data.setdefault("toolchain", {}))
        except SystemExit as stop:  # the phase recorded the error; nothing can be compiled here
            print(stop, file=sys.stderr)
            return 2

    checkpoint, engine = work / f"{args.preset}-checkpoint", work / f"{args.preset}-engine-torch"
    kit.data["work"] = {"path": str(work), "free_gib": round(shutil.disk_usage(work).free / 2**30, 1)}
    if not (checkpoint / "config.json").is_file():
        kit.phase("checkpoint", build_random_checkpoint, args.preset, checkpoint, device=args.device)
    if not (engine / "manifest.json").is_file():
        # The ONNX stages are written in fp32 whatever the preset: the kit never runs them, and fp32
        # spares the export a half-precision copy of the whole 7B model. The torch stages take the
        # device's dtype (bf16 on a GPU that has it, fp32 on a CPU).
        options = ExportOptions(checkpoint, engine, dtype="fp32", llm="none", torch=True, torch_device=args.device,
                                torch_dtype=args.torch_dtype, verify=False, force=engine.exists())
        manifest = kit.phase("export", export_engine, options, report=lambda line: log("  " + line.strip()))
        kit.data["phases"]["export"]["steps"] = {name: round(s, 1) for name, s, _ in manifest.get("_summary", [])}
        kit.write()
        del manifest
    if args.build_only:
        log(f"built {engine}; measure with the same --work")
        return 0
    import gc

    gc.collect()  # the export's device copies of the stages are not the backend's memory
    if args.device == "cuda":
        torch.cuda.empty_cache()

    options = bench.BenchOptions(synthetic_frames=args.frames, questions=args.questions, repeat=args.repeat,
                                 warmup=args.warmup, max_new_tokens=args.max_new_tokens)
    options.validate()
    memory = bench.HostMemory()
    pipe = kit.phase("open torch backend", Pipeline.open, engine, backend="torch", threads=args.threads)
    pipe.tokenizers.require()
    backend_result = kit.phase("bench torch backend", bench.bench_pipeline, pipe, options, log, name="torch",
                               memory=memory)
    kit.data["bench"] = bench.report(engine, options, [backend_result])  # kept if the eager phase fails
    if args.device == "cuda":  # beside bench's allocated peak: what the caching allocator held
        kit.data["cuda_memory_backend"] = {"max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                                           "max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20)}
    kit.write()
    eager_result = kit.phase("bench eager", bench_torch, checkpoint, pipe, options, args.device, log)
    data = bench.report(engine, options, [backend_result, eager_result], baseline=eager_result.name)
    kit.data["bench"] = data
    greedy = kit.phase("greedy check", greedy_check, pipe, options, eager_result.first_tokens,
                       backend_result.first_tokens)
    kit.data["greedy"] = greedy
    kit.data["cuda_graph_captures"] = getattr(pipe.decoder, "graph_captures", None)
    element = {"fp32": 4, "fp16": 2, "bf16": 2}[pipe.backend.precision]
    kit.data["decode_bytes"] = decode_bytes(engine, element, mean_position(data, options))
    kit.data["summary"] = summary(data, kit.data["bandwidth"], kit.data["decode_bytes"], device_name, greedy)
    kit.write()
    s = kit.data["summary"]
    ms = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    log(f"TTFT {ms(s['time_to_first_token_ms']['torch'])} ms (eager {ms(s['time_to_first_token_ms']['eager'])}); "
        f"decode {ms(s['decode_ms_per_token']['torch'])} ms/token (eager {ms(s['decode_ms_per_token']['eager'])}, floor "
        f"{ms(s['decode_floor_ms_per_token']['measured_bandwidth'])} at the measured bandwidth); end to end "
        f"{s['speedup_vs_eager']['end_to_end']}x eager; greedy {greedy['verdict']} (top-1 {greedy['top1_agreement']}); "
        f"wrote {args.out}")
    return 0 if greedy["verdict"] != "disagree" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vicuna-7b", help="random-weight preset (ppllava.presets; default vicuna-7b)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where everything runs (default cuda)")
    p.add_argument("--torch-dtype", default="auto",
                   help="the torch stages' and LLM's dtype (default: bf16 on a GPU that has it, fp32 on a CPU)")
    p.add_argument("--frames", type=int, default=32, help="synthetic frames per clip (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens decoded per question (default 100)")
    p.add_argument("--questions", type=int, default=2, help="1 first question + N-1 follow-ups (default 2)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--copy-mib", type=int, help="bandwidth copy size (default 4096 on a GPU, 256 on a CPU)")
    p.add_argument("--work", type=Path, help="where the checkpoint and engine go, and are reused from (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary folder")
    p.add_argument("--build-only", action="store_true", help="stop after the export (give --work: a second run "
                   "with it measures)")
    p.add_argument("--toolchain-check", choices=("auto", "on", "off"), default="auto",
                   help="compile a one-layer model with AOTInductor before the export (auto: on a GPU)")
    p.add_argument("--min-free-gib", type=float, help="free space --work needs before building (default 40, "
                   "2 for the small preset)")
    p.add_argument("--out", type=Path, required=True, help="the JSON to write (e.g. $OUT/gpu_kit.json)")
    args = p.parse_args(argv)
    if not args.out.parent.is_dir():
        print(f"gpu_kit: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return 2
    if args.build_only and args.work is None:
        print("gpu_kit: --build-only needs --work (where the second run finds the engine)", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.frames == 32 and args.preset == "small":
        args.frames = 8  # what `ppllava bench --random-weights small` takes
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
