"""``ppllava bench``: per-stage latency with honest statistics, through the same timing code path as
``ask --json`` (``Pipeline.ask`` fills ``Answer.timings``).

For each repeat the feature cache is emptied, the first question runs the whole path (decode and
sample, preprocess, vision, text, pool, prefill, decode) and further questions run the follow-up
path (vision cached). The very first run of the process is reported separately as "cold"; warm-up
runs are discarded; the rest give min / median / p95.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppllava.errors import InputError

log = logging.getLogger(__name__)

PHASES = ("hash", "decode_sample", "preprocess", "vision", "text", "pool", "prefill", "decode")  # timed phases of one answer
QUESTIONS = (
    "What happens in this video?",
    "What is the main object in the scene?",
    "Describe the colors and the setting.",
    "What might happen next?",
)


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


@dataclass
class BackendResult:
    name: str
    cold: Run | None = None
    first: list[Run] = field(default_factory=list)
    follow_up: list[Run] = field(default_factory=list)
    peak_host_mib: float | None = None
    peak_device_mib: float | None = None
    device: str | None = None  # the GPU (or "cpu") a device backend ran on
    first_tokens: list[int] = field(default_factory=list)  # greedy tokens of the cold run (identity check)

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
            "peak_host_mib": self.peak_host_mib,
            "peak_device_mib": self.peak_device_mib,
            "device": self.device,
        }


def peak_host_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


def bench_pipeline(pipe, options: BenchOptions, log_line=log.info, name: str = "onnxruntime") -> BackendResult:
    """Measure the onnxruntime pipeline (the product's path: ``Pipeline.ask``)."""
    from ppllava.runtime.cache import FeatureCache

    options.validate()
    video = options.video if options.video is not None else synthetic_frames(options.synthetic_frames, seed=options.seed)
    frames = options.frames if options.video is not None else None
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(options.questions)]
    result = BackendResult(name)
    pipe.backend.reset_peak_memory()  # device backends: the peak of this bench only
    for r in range(1 + options.warmup + options.repeat):
        pipe.cache = FeatureCache()  # every repeat starts cold for the video
        for q, question in enumerate(questions):
            t0 = time.perf_counter()
            answer = pipe.ask(video, question, frames=frames, tokens=options.tokens,
                              max_new_tokens=options.max_new_tokens, ignore_eos=True)
            run = Run(dict(answer.timings.ms), (time.perf_counter() - t0) * 1e3, len(answer.token_ids))
            if r == 0 and q == 0:
                result.cold = run
                result.first_tokens = list(answer.token_ids)
            elif r > options.warmup:
                (result.first if q == 0 else result.follow_up).append(run)
        log_line(f"{name} repeat {r + 1}/{1 + options.warmup + options.repeat} done")
    result.peak_host_mib = peak_host_mib()
    device = pipe.backend.device()  # the GPU (or "cpu") it ran on, and its peak memory where measured
    result.device, result.peak_device_mib = device.name, device.peak_mib
    return result


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def report(engine_dir: Path, options: BenchOptions, results: list[BackendResult], visual_tokens: int | None) -> dict:
    data = {
        "engine": str(engine_dir),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()},
        "visual_tokens": visual_tokens,
        "backends": {r.name: r.summary() for r in results},
    }
    if len(results) > 1:
        base = data["backends"][results[0].name]["first_question"]
        other = data["backends"][results[1].name]["first_question"]
        ratios = {}
        for stage in PHASES:
            a, b = base["stages_ms"].get(stage), other["stages_ms"].get(stage)
            if a and b and a["median"] > 0:
                ratios[stage] = b["median"] / a["median"]
        for key in ("time_to_first_token_ms", "end_to_end_ms", "decode_ms_per_token"):
            if base.get(key) and other.get(key) and base[key]["median"] > 0:
                ratios[key.removesuffix("_ms")] = other[key]["median"] / base[key]["median"]
        data["same_inputs_same_tokens"] = results[0].first_tokens == results[1].first_tokens
        data["ratios"] = {"meaning": f"{results[1].name} median / {results[0].name} median (> 1: {results[0].name} is faster)",
                          **{k: round(v, 3) for k, v in ratios.items()}}
    return data


def format_table(data: dict) -> str:
    backends = list(data["backends"])
    lines = [f"{'stage (ms)':<22}" + "".join(f"{name + ' min/median/p95':>34}" for name in backends)
             + ("   ratio" if "ratios" in data else "")]

    def row(label, getter, ratio_key=None):
        cells = []
        for name in backends:
            stats = getter(data["backends"][name])
            cells.append(f"{stats['min']:>10.2f} {stats['median']:>10.2f} {stats['p95']:>10.2f}  " if stats else f"{'-':>34}")
        ratio = data.get("ratios", {}).get(ratio_key) if ratio_key else None
        lines.append(f"{label:<22}" + "".join(cells) + (f"{ratio:>8.2f}x" if ratio else ""))

    for stage in PHASES:
        if any(b["first_question"] and stage in b["first_question"]["stages_ms"] for b in data["backends"].values()):
            row(stage, lambda b, s=stage: b["first_question"]["stages_ms"].get(s), stage)
    row("time to first token", lambda b: b["first_question"]["time_to_first_token_ms"], "time_to_first_token")
    row("decode ms/token", lambda b: b["first_question"]["decode_ms_per_token"], "decode_ms_per_token")
    row("end to end", lambda b: b["first_question"]["end_to_end_ms"], "end_to_end")
    row("follow-up TTFT", lambda b: b["follow_up"].get("time_to_first_token_ms") if b["follow_up"] else None)
    row("follow-up end to end", lambda b: b["follow_up"].get("end_to_end_ms") if b["follow_up"] else None)
    for name in backends:
        b = data["backends"][name]
        cold = b["cold"]
        tps = b["first_question"].get("tokens_per_s")
        lines.append(
            f"{name}: cold first run {cold['end_to_end_ms']:.1f} ms end to end" if cold else f"{name}:"
        )
        lines[-1] += (f"; {tps:.1f} tokens/s" if tps else "") + (
            f"; peak host memory {b['peak_host_mib']:.0f} MiB" if b["peak_host_mib"] else "")
        if b.get("peak_device_mib"):
            lines[-1] += f"; peak device memory {b['peak_device_mib']:.0f} MiB"
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Stacked per-stage medians per backend, first question and follow-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'ppllava[bench]'") from None
    bars = []
    for name, b in data["backends"].items():
        for label, block in (("first question", b["first_question"]), ("follow-up", b["follow_up"])):
            if block:
                bars.append((f"{name}\n{label}", {s: block["stages_ms"][s]["median"] for s in PHASES if s in block["stages_ms"]}))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(bars)))
    colors = plt.get_cmap("tab10")
    for i, (label, stages) in enumerate(bars):
        left = 0.0
        for j, stage in enumerate(PHASES):
            width = stages.get(stage, 0.0)
            ax.barh(i, width, left=left, color=colors(j), label=stage if i == 0 else None)
            left += width
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("median milliseconds per question")
    ax.set_title(f"ppllava bench: {Path(data['engine']).name} ({data['machine']['cpu_count']} CPU cores)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize="small", ncols=len(PHASES), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
