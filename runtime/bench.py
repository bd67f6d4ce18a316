"""``ppllava bench``: per-stage latency with honest statistics, through the same timing code path as
``ask --json`` (``Pipeline.ask`` fills ``Answer.timings``).

For each repeat the feature cache is emptied, the first question runs the whole path (decode and
sample, preprocess, vision, text, pool, prefill, decode) and further questions run the follow-up
path (vision cached). The very first run of the process is reported separately as "cold"; warm-up
runs are discarded; the rest give min / median / p95. The report says what was measured (frames,
tokens, stage precisions, providers, threads, package versions) and where (CPU, GPU), so that
reports from two machines can be compared.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ppllava.errors import InputError
from ppllava.runtime.host import usable_cores

log = logging.getLogger(__name__)

PHASES = ("hash", "decode_sample", "preprocess", "vision", "text", "pool", "prefill", "decode")  # timed phases of one answer
QUESTIONS = (
    "What happens in this video?",
    "What is the main object in the scene?",
    "Describe the colors and the setting.",
    "What might happen next?",
)
# (label in the report, module) of the versions a report records; the first four even where absent (None)
PACKAGES = (("onnxruntime", "onnxruntime"), ("numpy", "numpy"), ("opencv", "cv2"), ("tokenizers", "tokenizers"),
            ("tensorrt", "tensorrt"), ("tensorrt_llm", "tensorrt_llm"), ("torch", "torch"))


@dataclass
class BenchOptions:
    video: Path | None = None
    synthetic_frames: int | None = None
    frames: int | None = None
    questions: int = 2
    repeat: int = 5
    warmup: int = 1
    tokens: int | None = None
    max_new_tokens: int = 32
    seed: int = 0

    def validate(self) -> None:
        if (self.video is None) == (self.synthetic_frames is None):
            raise InputError("give exactly one of --video or --synthetic-frames")
        for name in ("questions", "repeat", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {self.warmup}")
        if self.synthetic_frames is not None and self.synthetic_frames < 1:
            raise InputError(f"--synthetic-frames must be >= 1, got {self.synthetic_frames}")


def progress(name: str, r: int, options: BenchOptions) -> str:
    """The progress line after run ``r`` of the schedule: the cold run, the warm-ups (discarded) and
    the repeats (measured) are counted apart, so "repeat 5/5" means five measured repeats."""
    if r == 0:
        return f"{name}: cold run done"
    if r <= options.warmup:
        return f"{name}: warm-up {r}/{options.warmup} done (discarded)"
    return f"{name}: repeat {r - options.warmup}/{options.repeat} done"


def summarize(values: list[float]) -> dict[str, float]:
    """min / median / p95 (linear interpolation, as numpy) / mean of a list of milliseconds."""
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "n": len(values)}


@dataclass
class Run:
    """One question's measurements (ms), as Answer.timings plus derived values."""

    stages: dict[str, float]
    end_to_end: float
    new_tokens: int

    @property
    def ttft(self) -> float:
        return sum(v for k, v in self.stages.items() if k != "decode")

    @property
    def ms_per_token(self) -> float | None:
        steps = self.new_tokens - 1
        return self.stages.get("decode", 0.0) / steps if steps > 0 else None


def _proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB ({} without /proc)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 1024.0 for k, _, v in (line.partition(":") for line in lines)
            if k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (VmHWM) to its current resident size by
    writing "5" to /proc/self/clear_refs (Linux >= 4.0); True where the kernel did."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    now = _proc_status()
    return bool(now) and now["VmHWM"] <= now["VmRSS"] * 1.01 + 1.0  # one snapshot; RSS may drop a little after


class HostMemory:
    """Host memory of one backend's window, from before it is opened to the end of its measurement.

    Linux keeps one resident-memory peak per process (VmHWM, also what getrusage's ru_maxrss
    reports), so a second backend's peak would include the first's. The window resets it where the
    kernel allows; elsewhere the window's peak is known only if the process peak rose inside it, and
    otherwise the resident size at the end stands in (a lower bound). ``method`` says which. The
    peak includes what earlier backends still hold; ``own`` is the rise over the resident size when
    the window opened: what this backend added."""

    def __init__(self):
        self.before = _proc_status()
        self.reset = reset_peak_rss()

    def stop(self) -> dict:
        now = _proc_status()
        if not now or not self.before:  # no /proc (macOS): only the process-wide peak exists
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024.0)
            return {"peak_host_mib": peak, "host_baseline_mib": None, "peak_host_own_mib": None,
                    "peak_host_method": "process-wide peak since start (getrusage; no /proc here)"}
        if self.reset:
            peak, method = now["VmHWM"], "peak RSS in this backend's window (VmHWM reset via /proc/self/clear_refs)"
        elif now["VmHWM"] > self.before["VmHWM"]:
            peak, method = now["VmHWM"], "process peak RSS, which rose in this backend's window (VmHWM; no reset here)"
        else:
            peak, method = now["VmRSS"], "RSS at the end of this backend's run (peak not resettable here: a lower bound)"
        return {"peak_host_mib": peak, "host_baseline_mib": self.before["VmRSS"],
                "peak_host_own_mib": peak - self.before["VmRSS"], "peak_host_method": method}


@dataclass
class BackendResult:
    name: str
    cold: Run | None = None
    first: list[Run] = field(default_factory=list)
    follow_up: list[Run] = field(default_factory=list)
    peak_host_mib: float | None = None  # peak RSS in this backend's window (HostMemory)
    peak_device_mib: float | None = None
    device: str | None = None  # the GPU (or "cpu") a device backend ran on
    first_tokens: list[int] = field(default_factory=list)  # greedy tokens of the cold run (identity check)
    memory: dict = field(default_factory=dict)  # HostMemory.stop(): baseline, own rise, method
    inputs: dict = field(default_factory=dict)  # frames, visual_tokens, prompt_tokens (per question) of the cold run
    runtime: dict = field(default_factory=dict)  # backend, precision, stage_precisions, providers, threads, engine_fingerprint
    probes: list = field(default_factory=list)  # rate_probe.RateProbe results: before each repeat and after the last

    def finish(self, memory: HostMemory) -> None:
        self.memory = memory.stop()
        self.peak_host_mib = self.memory["peak_host_mib"]

    def summary(self) -> dict:
        def block(runs: list[Run]) -> dict:
            if not runs:
                return {}
            stages = {s: summarize([r.stages[s] for r in runs if s in r.stages]) for s in PHASES}
            per_token = [r.ms_per_token for r in runs if r.ms_per_token]
            return {
                "stages_ms": {k: v for k, v in stages.items() if v},
                "time_to_first_token_ms": summarize([r.ttft for r in runs]),
                "end_to_end_ms": summarize([r.end_to_end for r in runs]),
                "decode_ms_per_token": summarize(per_token),
                "tokens_per_s": (1000.0 / float(np.median(per_token))) if per_token else None,
                "new_tokens": summarize([float(r.new_tokens) for r in runs]),
            }

        return {
            "cold": None if self.cold is None else {"stages_ms": self.cold.stages, "end_to_end_ms": self.cold.end_to_end,
                                                    "time_to_first_token_ms": self.cold.ttft},
            "first_question": block(self.first),
            "follow_up": block(self.follow_up),
            **self.memory,
            "peak_host_mib": self.peak_host_mib,
            "peak_device_mib": self.peak_device_mib,
            "device": self.device,
            "inputs": self.inputs,
            **self.runtime,
            **({"rate_probes": self.probes} if self.probes else {}),
        }


def synthetic_frames(count: int, size: int = 448, seed: int = 0) -> np.ndarray:
    """A deterministic moving pattern, (T, size, size, 3) uint8 RGB: no video file needed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = []
    for t in range(count):
        phase = t / max(count, 1)
        rgb = np.stack([np.sin(6.28 * (x + phase)), np.cos(6.28 * (y - phase)), x * y], -1) * 0.5 + 0.5
        frames.append(np.clip(rgb * 255 + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8))
    return np.stack(frames)


def stage_precisions(pipe) -> dict[str, str]:
    """What each stage ran in: its artifact's recorded precision (else the backend's compute dtype),
    the LLM's from the record of the LLM the backend's decoder loads."""
    from ppllava.runtime.backends import STAGES

    backend = pipe.backend
    out = {s: backend.artifact(s).get("precision") or backend.compute_dtype for s in STAGES}
    llm = backend.llm_artifact()
    out["llm"] = None if llm is None else llm.get("precision") or backend.compute_dtype  # None: --llm none
    return out


def repeats(options: BenchOptions, result: BackendResult, probe=None, log_line=log.info):
    """The schedule's repeats, 0 the cold run, then ``options.warmup`` warm-ups and the measured
    ones; ``probe`` (a ``rate_probe.RateProbe``) runs before each measured repeat and after the last,
    its rates kept in ``result.probes``; each finished repeat is said through ``log_line``."""
    for r in range(1 + options.warmup + options.repeat):
        if probe is not None and r > options.warmup:
            result.probes.append(probe())
        yield r
        log_line(progress(result.name, r, options))
    if probe is not None:
        result.probes.append(probe())


def bench_pipeline(pipe, options: BenchOptions, log_line=log.info, name: str = "onnxruntime",
                   memory: HostMemory | None = None, probe=None) -> BackendResult:
    """Measure the pipeline (the product's path: ``Pipeline.ask``). ``memory``: a window the caller
    started before opening ``pipe`` (default: one started now, so opening is not counted).
    ``probe``: a ``rate_probe.RateProbe``, run before each measured repeat and after the last."""
    from ppllava.runtime.cache import FeatureCache

    options.validate()
    memory = memory or HostMemory()
    video = options.video if options.video is not None else synthetic_frames(options.synthetic_frames, seed=options.seed)
    frames = options.frames if options.video is not None else None
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(options.questions)]
    result = BackendResult(name)
    pipe.backend.reset_peak_memory()  # device backends: the peak of this bench only
    prompt_tokens = []
    for r in repeats(options, result, probe, log_line):
        pipe.cache = FeatureCache()  # every repeat starts cold for the video
        for q, question in enumerate(questions):
            t0 = time.perf_counter()
            answer = pipe.ask(video, question, frames=frames, tokens=options.tokens,
                              max_new_tokens=options.max_new_tokens, ignore_eos=True)
            run = Run(dict(answer.timings.ms), (time.perf_counter() - t0) * 1e3, len(answer.token_ids))
            if r == 0:
                prompt_tokens.append(answer.prompt_tokens)
                if q == 0:
                    result.cold = run
                    result.first_tokens = list(answer.token_ids)
                    result.inputs = {"frames": answer.frames, "media_type": answer.media_type,
                                     "visual_tokens": answer.visual_tokens}
            elif r > options.warmup:
                (result.first if q == 0 else result.follow_up).append(run)
    result.inputs["prompt_tokens"] = prompt_tokens
    result.finish(memory)
    device = pipe.backend.device()  # the GPU (or "cpu") it ran on, and its peak memory where measured
    result.device, result.peak_device_mib = device.name, device.peak_mib
    opts = pipe.backend.options
    result.runtime = {"backend": pipe.backend.name, "precision": opts.precision, "stage_precisions": stage_precisions(pipe),
                      "providers": list(opts.providers), "threads": opts.threads,
                      "engine_fingerprint": pipe.manifest.data["source"].get("fingerprint")}
    return result


def cpu_model() -> str:
    """The CPU's marketing name (x86: /proc/cpuinfo "model name"; Jetson: the board's model)."""
    for path, key in (("/proc/cpuinfo", "model name"), ("/proc/device-tree/model", None)):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if key is None:
            return text.strip("\x00\n ")
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# The instruction-set extensions the CPU kernels (MLAS, oneDNN, llama.cpp) dispatch on, as /proc/cpuinfo
# spells them: "flags" on x86, "Features" on Arm. A VM's model name may not say the generation
# ("Intel(R) Xeon(R) Processor"); these and the family/model numbers do.
KERNEL_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16",
              "amx_int8", "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")


def cpu_features(cpuinfo: str | None = None) -> dict:
    """{"cpu_id": "vendor family/model/stepping" (x86) or "implementer/part" (Arm), "cpu_isa": the
    KERNEL_ISA extensions this CPU reports}, from the first processor of /proc/cpuinfo (``cpuinfo``:
    its text); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return {}
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "vendor_id" in fields:
        ident = f"{fields['vendor_id']} {fields.get('cpu family', '?')}/{fields.get('model', '?')}/{fields.get('stepping', '?')}"
    elif "CPU implementer" in fields:
        ident = f"{fields['CPU implementer']}/{fields.get('CPU part', '?')}"
    else:
        return {}
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu_id": ident, "cpu_isa": [f for f in KERNEL_ISA if f in present]}


def machine(results: list[BackendResult] = ()) -> dict:
    gpus = [r.device for r in results if r.device and r.device != "cpu"]
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), **cpu_features(), "cpu_count": os.cpu_count(), "cpu_usable": usable_cores(),
            "gpu": gpus[0] if gpus else None, "python": platform.python_version()}


def versions() -> dict[str, str | None]:
    """Versions of what was measured: the installed distribution's (opencv's has the build number its
    ``__version__`` lacks), else a loaded module's own; torch only where this process loaded it."""
    from importlib import metadata

    import ppllava

    dists = metadata.packages_distributions()
    out = {"ppllava": ppllava.__version__}
    for i, (label, module) in enumerate(PACKAGES):
        if module == "torch" and sys.modules.get("torch") is None:
            continue
        found = dists.get(module)
        version = metadata.version(found[0]) if found else getattr(sys.modules.get(module), "__version__", None)
        if version or i < 4:
            out[label] = version
    return out


def report(engine_dir: Path, options: BenchOptions, results: list[BackendResult], baseline: str | None = None) -> dict:
    """The JSON report. With two backends, ``ratios`` are ``baseline`` median / the other's median
    (> 1: the other is faster), the baseline named in the report (default: the first backend)."""
    first = results[0]
    data = {
        "engine": str(engine_dir),
        "engine_fingerprint": first.runtime.get("engine_fingerprint"),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(results),
        "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()},
        "sampled_frames": first.inputs.get("frames"),
        "visual_tokens": first.inputs.get("visual_tokens"),
        "prompt_tokens": (first.inputs.get("prompt_tokens") or [None])[0],  # the first question's, visual included
        "backends": {r.name: r.summary() for r in results},
    }
    if len(results) > 1:
        base_name = baseline or first.name
        base_result = next(r for r in results if r.name == base_name)
        base = data["backends"][base_name]["first_question"]
        by_run = {}
        for other_result in results:
            if other_result.name == base_name:
                continue
            this, other = other_result.name, data["backends"][other_result.name]["first_question"]
            ratios = {}
            for stage in PHASES:
                a, b = base["stages_ms"].get(stage), other["stages_ms"].get(stage)
                if a and b and b["median"] > 0:
                    ratios[stage] = a["median"] / b["median"]
            for key in ("time_to_first_token_ms", "end_to_end_ms", "decode_ms_per_token"):
                if base.get(key) and other.get(key) and other[key]["median"] > 0:
                    ratios[key.removesuffix("_ms")] = base[key]["median"] / other[key]["median"]
            by_run[this] = {"meaning": f"{base_name} median / {this} median (> 1: {this} is faster)",
                            "baseline": base_name, "this": this,
                            "same_tokens_as_baseline": other_result.first_tokens == base_result.first_tokens,
                            **{k: round(v, 3) for k, v in ratios.items()}}
        first_other = next(iter(by_run.values()))
        data["same_inputs_same_tokens"] = all(r["same_tokens_as_baseline"] for r in by_run.values())
        data["baseline"] = base_name
        data["ratios"] = {k: v for k, v in first_other.items() if k != "same_tokens_as_baseline"}  # the first pair
        data["ratios_by_run"] = by_run  # every run against the baseline
    return data


def rows(data: dict):
    """(label, {backend: stats}, ratio key) of the first question's stages and totals, then the
    follow-up's totals: what the table prints and the chart draws."""
    backends = data["backends"]

    def stats(getter):
        found = {name: getter(b) for name, b in backends.items()}
        return {name: s for name, s in found.items() if s}

    for stage in PHASES:
        found = stats(lambda b, s=stage: b["first_question"] and b["first_question"]["stages_ms"].get(s))
        if found:
            yield stage, found, stage
    for label, key, ratio in (("time to first token", "time_to_first_token_ms", "time_to_first_token"),
                              ("decode ms/token", "decode_ms_per_token", "decode_ms_per_token"),
                              ("end to end", "end_to_end_ms", "end_to_end")):
        yield label, stats(lambda b, k=key: b["first_question"] and b["first_question"][k]), ratio
    for label, key in (("follow-up TTFT", "time_to_first_token_ms"), ("follow-up end to end", "end_to_end_ms")):
        yield label, stats(lambda b, k=key: b["follow_up"] and b["follow_up"].get(k)), None


def settings_lines(data: dict) -> list[str]:
    """What was measured and where, in words: the table's heading and the chart's caption."""
    s, m = data["settings"], data["machine"]
    clip = s["video"] or f"synthetic clip of {s['synthetic_frames']}"
    budget = f"--tokens {s['tokens']}" if s["tokens"] else "the pooling plan"
    inputs = (f"inputs: {clip} -> {data['sampled_frames']} frames sampled, {data['visual_tokens']} visual tokens "
              f"({budget}), prompt {data['prompt_tokens']} tokens, max-new-tokens {s['max_new_tokens']} (end of "
              f"text ignored); {s['questions']} questions, {s['repeat']} repeats after {s['warmup']} warm-up")
    lines = [f"engine {Path(data['engine']).name} ({(data.get('engine_fingerprint') or '?')[:12]}), {data['timestamp_utc']}",
             inputs]
    for name, b in data["backends"].items():
        precisions = b.get("stage_precisions") or {}
        kinds = set(precisions.values())
        precision = kinds.pop() if len(kinds) == 1 else ", ".join(f"{k} {v}" for k, v in precisions.items()) or "?"
        providers = ",".join(b["providers"]) if b.get("providers") else "-"
        threads = b.get("threads") or "default"
        lines.append(f"{name}: precision {precision}; providers {providers}; threads {threads}; on {b['device']}")
    ident = f"{m['cpu_id']}; {' '.join(m.get('cpu_isa') or []) or '-'}; " if m.get("cpu_id") else ""
    lines.append(f"CPU {m['cpu_model']} ({ident}{m['cpu_usable']} of {m['cpu_count']} cores usable); GPU {m['gpu'] or 'none'}; "
                 + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
    if len(data.get("ratios_by_run") or {}) > 1:
        lines.append(f"ratio = {data['baseline']} median / the other's median (> 1: the other is faster)")
    elif "ratios" in data:
        lines.append("ratio = " + data["ratios"]["meaning"])
    return lines


def format_table(data: dict) -> str:
    backends = list(data["backends"])
    by_run = data.get("ratios_by_run") or ({data["ratios"]["this"]: data["ratios"]} if "ratios" in data else {})
    lines = [*settings_lines(data), ""]
    lines.append(f"{'stage (ms)':<22}" + "".join(f"{name + ' min/median/p95':>34}" for name in backends)
                 + "".join(f"  ratio {r['baseline']}/{this}" for this, r in by_run.items()))
    widths = [len(f"  ratio {r['baseline']}/{this}") for this, r in by_run.items()]
    for label, found, ratio_key in rows(data):
        cells = [f"{found[n]['min']:>10.2f} {found[n]['median']:>10.2f} {found[n]['p95']:>10.2f}  " if n in found
                 else f"{'-':>34}" for n in backends]
        ratios = [r.get(ratio_key) if ratio_key else None for r in by_run.values()]
        lines.append(f"{label:<22}" + "".join(cells)
                     + "".join(f"{x:>{w - 1}.2f}x" if x else " " * w for x, w in zip(ratios, widths)).rstrip())
    for name in backends:
        b = data["backends"][name]
        cold = b["cold"]
        tps = b["first_question"].get("tokens_per_s")
        lines.append(f"{name}: cold first run {cold['end_to_end_ms']:.1f} ms end to end" if cold else f"{name}:")
        lines[-1] += f"; {tps:.1f} tokens/s" if tps else ""
        if b["peak_host_mib"]:
            lines[-1] += f"; peak host memory {b['peak_host_mib']:.0f} MiB"
            if b.get("peak_host_own_mib") is not None:
                lines[-1] += f" ({b['peak_host_own_mib']:+.0f} MiB over the {b['host_baseline_mib']:.0f} MiB before it)"
        if b.get("peak_device_mib"):
            lines[-1] += f"; peak device memory {b['peak_device_mib']:.0f} MiB"
        if name in by_run:
            lines[-1] += "; same greedy tokens as " + by_run[name]["baseline"] if by_run[name].get(
                "same_tokens_as_baseline", True) else "; other greedy tokens than " + by_run[name]["baseline"]
    if data.get("floors"):
        from ppllava.runtime.floors import format_lines

        lines += ["", *format_lines(data["floors"])]
    return "\n".join(lines)


@dataclass
class Chart:
    """What the PNG shows: per row (stage or total) each backend's p50 and p95 in ms, and the settings."""

    title: str
    settings: list[str]
    rows: list[tuple[str, dict[str, tuple[float, float]]]]  # (label, {backend: (p50, p95)})
    backends: list[str]
    floors: dict[str, float] = field(default_factory=dict)  # row label -> this machine's floor (ms)


def chart(data: dict) -> Chart:
    floors = {("decode ms/token" if stage == "decode" else stage): f["floor_ms"]
              for stage, f in (data.get("floors") or {}).get("stages", {}).items()}
    return Chart(f"ppllava bench: {Path(data['engine']).name}", settings_lines(data),
                 [(label, {n: (s["median"], s["p95"]) for n, s in found.items()}) for label, found, _ in rows(data) if found],
                 list(data["backends"]), floors)


def require_plotting() -> None:
    """Refuse --plot up front where matplotlib is missing (not after the whole benchmark ran)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'ppllava[bench]'") from None


def draw(c: Chart):
    """A matplotlib figure: per row, a bar (p50) with a whisker to p95 and both numbers for each
    backend, on a log axis (hash takes microseconds, decode seconds); the settings as the caption."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.8 / max(len(c.backends), 1)
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.3 * len(c.settings) + 0.3 * len(c.rows) * len(c.backends)))
    colors = plt.get_cmap("tab10")
    top = max((p95 for _, found in c.rows for _, p95 in found.values()), default=1.0)
    floor = max(min((p50 for _, found in c.rows for p50, _ in found.values() if p50 > 0), default=1.0) / 2, 1e-3)
    for i, (_, found) in enumerate(c.rows):
        for j, name in enumerate(c.backends):
            if name not in found:
                continue
            p50, p95 = found[name]
            y = i + (j - (len(c.backends) - 1) / 2) * height
            ax.barh(y, max(p50, floor) - floor, left=floor, height=height * 0.9, color=colors(j), label=name if i == 0 else None)
            ax.errorbar(max(p50, floor), y, xerr=[[0], [max(p95 - p50, 0)]], fmt="none", ecolor="black", capsize=2, lw=0.8)
            ax.text(max(p95, floor) * 1.15, y, f"p50 {p50:.3g} / p95 {p95:.3g} ms", va="center", fontsize="x-small")
    marked = False
    for i, (label, _) in enumerate(c.rows):
        if c.floors.get(label, 0) > 0:  # this machine's floor for the row: a black tick across its bars
            ax.plot([max(c.floors[label], floor)] * 2, [i - 0.45, i + 0.45], color="black", lw=1.5,
                    label=None if marked else "floor on this machine")
            marked = True
    ax.set_xscale("log")
    ax.set_xlim(floor, top * 40)
    ax.set_yticks(range(len(c.rows)), [label for label, _ in c.rows])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds (log scale): bar = p50 (median), whisker = p95")
    caption = [part for line in c.settings for part in textwrap.wrap(line, 120, subsequent_indent="    ")]
    ax.set_title("\n".join([c.title, *caption]), loc="left", fontsize="small")
    if len(c.backends) > 1 or c.rows:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def plot(data: dict, path: Path) -> Chart:
    """Write the chart as a PNG; returns what it shows."""
    c = chart(data)
    fig = draw(c)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return c


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
