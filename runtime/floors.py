"""What each stage could take on this machine at best, so a latency says what is left.

Two machine rates, measured with onnxruntime on the threads the bench runs with (or given by the
user): the fp32 GEMM rate (MLAS SGEMM on a 2048x1024x1024 MatMul) and the rate at which a
decode-shaped MatMul (one row against a 256 MiB weight) reads its weights, the memory bandwidth a
decode step can use. Both are the best of several runs, after the bench's runs and (``rate_probe``)
around each of its repeats: a floor is what the machine can do, not what it did on average; each
repeat is also judged against its floor at the rates probed around it (``paired_ratio``).

Two costs per stage, counted from onnxruntime's own profile of one answer on the exported (fp32)
stages with the bench's inputs: the FLOPs of its matrix products (MatMul, Gemm, Conv, the LLM's
attention kernels) from the shapes each node ran with, and the weight bytes its nodes read
(``node_weight_bytes``), plus, for a decode step, the KV cache it reads. A stage's floor is
the larger of FLOPs / GEMM rate and bytes / bandwidth (a roofline without the non-GEMM ops, so for an
fp32 run a ratio of 1.0 is not reachable, and 1.2 is close). The floors are the fp32 export's: a run
at another precision (the int8 vision stage) can go below 1.0.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ppllava.errors import InputError

# Y = MatMul(X[M, K], W[K, N]) with both as inputs (opset 17, IR 8): onnx.helper's serialization of
# that graph (tests/test_floors.py rebuilds it), so measuring needs onnxruntime only.
MATMUL_ONNX = (
    b'\x08\x08\x12\x07ppllava:^\n\x11\n\x01X\n\x01W\x12\x01Y"\x06MatMul\x12\x04gemmZ\x15\n\x01X\x12\x10\n\x0e\x08'
    b'\x01\x12\n\n\x03\x12\x01M\n\x03\x12\x01KZ\x15\n\x01W\x12\x10\n\x0e\x08\x01\x12\n\n\x03\x12\x01K\n\x03\x12'
    b'\x01Nb\x15\n\x01Y\x12\x10\n\x0e\x08\x01\x12\n\n\x03\x12\x01M\n\x03\x12\x01NB\x04\n\x00\x10\x11'
)
GEMM_SHAPE = (2048, 1024, 1024)  # M, K, N: 4.3 GFLOP, large enough for every core to stay busy
GEMV_SHAPE = (1, 8192, 8192)  # 256 MiB of fp32 weights: past any last-level cache here
FLOOR_STAGES = ("vision", "text", "pool", "prefill", "decode")  # decode: per token


@dataclass(frozen=True)
class Rates:
    gemm_gflops: float
    bandwidth_gbs: float
    source: str


def _best_seconds(run, repeat: int) -> float:
    run()  # warm-up: arena allocation, thread start
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


class Rater:
    """One onnxruntime MatMul session on ``threads`` and its two feeds: the GEMM and the
    decode-shaped weight read."""

    def __init__(self, threads: int | None):
        from ppllava.runtime.backends.onnxruntime import make_session

        self.threads = threads
        self.session = make_session(MATMUL_ONNX, threads=threads)

        def feed(m, k, n):  # the values do not change the time (no denormals); a fill is quick to make
            return {"X": np.full((m, k), 0.5, np.float32), "W": np.full((k, n), 0.25, np.float32)}

        self.gemm, self.gemv = feed(*GEMM_SHAPE), feed(*GEMV_SHAPE)

    def rates(self, repeat: int) -> Rates:
        m, k, n = GEMM_SHAPE
        gflops = 2.0 * m * k * n / _best_seconds(lambda: self.session.run(None, self.gemm), repeat) / 1e9
        gbs = self.gemv["W"].nbytes / _best_seconds(lambda: self.session.run(None, self.gemv), repeat) / 1e9
        return Rates(gflops, gbs, f"measured: onnxruntime MatMul {m}x{k}x{n} and 1x{GEMV_SHAPE[1]}x{GEMV_SHAPE[2]} "
                                  f"fp32, {self.threads or 'default'} threads, best of {repeat}")


def measure_rates(threads: int | None = None, repeat: int = 20) -> Rates:
    """This machine's fp32 GEMM rate and decode-shaped weight-read bandwidth, with onnxruntime on
    ``threads`` (None: its default)."""
    return Rater(threads).rates(repeat)


def check_rates(gemm_gflops: float | None, bandwidth_gbs: float | None) -> None:
    for name, value in (("--gemm-gflops", gemm_gflops), ("--bandwidth-gbs", bandwidth_gbs)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InputError(f"{name} must be a finite number > 0, got {value}")


def given_rates(gemm_gflops: float | None, bandwidth_gbs: float | None, measured) -> Rates:
    """The user's --gemm-gflops / --bandwidth-gbs where given, the rest from ``measured()``."""
    check_rates(gemm_gflops, bandwidth_gbs)
    if gemm_gflops is not None and bandwidth_gbs is not None:
        return Rates(gemm_gflops, bandwidth_gbs, "given (--gemm-gflops, --bandwidth-gbs)")
    rates = measured()
    return Rates(gemm_gflops or rates.gemm_gflops, bandwidth_gbs or rates.bandwidth_gbs,
                 rates.source + ("; GEMM rate given" if gemm_gflops else "") + ("; bandwidth given" if bandwidth_gbs else ""))


def _shape(entry: dict) -> list[int]:
    return next(iter(entry.values())) if entry else []


ITEMSIZE = {"float": 4, "float16": 2, "bfloat16": 2, "double": 8}
ATTENTION = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


def node_weight_bytes(op: str, args: dict) -> int:
    """The weight bytes one node reads. A MatMul/Gemm whose weight onnxruntime prepacked lists only
    its activation among its run shapes (and 0 as parameter size): its (K, N) weight is counted from
    the activation's K and the output's N. Attention kernels report their rotary tables as
    parameters, and a Gather its embedding table, of which a run reads a few rows: not counted."""
    inputs = args.get("input_type_shape", [])
    if op in ("MatMul", "Gemm", "FusedMatMul") and len(inputs) == 1:
        kind, shape = next(iter(inputs[0].items()))
        out = _shape(args.get("output_type_shape", [{}])[0])
        return int(shape[-1]) * int(out[-1]) * ITEMSIZE.get(kind, 4) if shape and out else 0
    if op in ATTENTION or op == "Gather":  # a Gather reads the rows it picks, not its table
        return 0
    return int(args.get("parameter_size", 0) or 0)


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """FLOPs (multiply and add counted apart) of one node's matrix products, from its run shapes."""
    out = outputs[0] if outputs else []
    if op in ("MatMul", "MatMulInteger", "FusedMatMul") and inputs and inputs[0]:  # a prepacked weight is not listed
        return 2.0 * float(np.prod(out)) * inputs[0][-1]  # every output element: a K-long dot product
    if op in ("Gemm", "MatMulNBits") and inputs and inputs[0]:
        return 2.0 * float(np.prod(out)) * inputs[0][-1]
    if op in ("Conv", "FusedConv") and len(inputs) >= 2:
        return 2.0 * float(np.prod(out)) * float(np.prod(inputs[1][1:]))  # kernel: (Cout, Cin/groups, *k)
    if op in ATTENTION and inputs and len(inputs[0]) == 3:
        batch, steps, width = inputs[0]  # query (B, S, heads x head_dim)
        total = steps
        if op == "GroupQueryAttention" and len(inputs) > 3 and len(inputs[3]) == 4:
            total = max(steps, 1)  # past length is not in the shapes (an in-place buffer): counted as S
        return 4.0 * batch * steps * total * width  # QK^T and PV
    return 0.0


def profile_costs(path: Path) -> list[dict]:
    """Per ``model_run`` of an onnxruntime profile: {"flops", "weight_bytes"} of its nodes."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    costs = [{"flops": 0.0, "weight_bytes": 0} for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        at = next((i for i, (start, end) in enumerate(runs) if start <= e["ts"] <= end), None)
        if at is None:
            continue
        args = e.get("args", {})
        shapes_in = [_shape(x) for x in args.get("input_type_shape", [])]
        shapes_out = [_shape(x) for x in args.get("output_type_shape", [])]
        costs[at]["flops"] += node_flops(args.get("op_name", ""), shapes_in, shapes_out)
        costs[at]["weight_bytes"] += node_weight_bytes(args.get("op_name", ""), args)
    return costs


def stage_costs(engine_dir: Path, video, question: str, frames: int | None, tokens: int | None,
                threads: int | None, new_tokens: int) -> dict:
    """FLOPs and bytes of each stage for one answer with the bench's inputs, from a profiled run of
    the exported stages (and the exported ONNX LLM) in a pipeline of its own."""
    from ppllava.runtime.backends import BackendOptions
    from ppllava.runtime.backends.onnxruntime import OnnxruntimeBackend
    from ppllava.runtime.cache import FeatureCache
    from ppllava.runtime.manifest import Manifest
    from ppllava.runtime.pipeline import Pipeline

    manifest = Manifest.load(engine_dir)
    exported = manifest.stage("vision").get("precision", "fp32")
    with tempfile.TemporaryDirectory(prefix="ppllava-floors-") as scratch:
        backend = OnnxruntimeBackend(manifest, BackendOptions(threads=threads, precision=exported))
        backend.profile_dir = Path(scratch)
        with Pipeline(manifest, backend) as pipe:
            pipe.cache = FeatureCache()
            answer = pipe.ask(video, question, frames=frames, tokens=tokens, max_new_tokens=2, ignore_eos=True)
            files = {name: stage.session.end_profiling() for name, stage in pipe.stages.items()}
            decoder = pipe.decoder
            if decoder is not None:
                files["llm"] = decoder.session.end_profiling()
            costs = {name: profile_costs(path) for name, path in files.items()}
    out = {name: costs[name][0] for name in ("vision", "text", "pool") if costs.get(name)}
    llm = costs.get("llm") or []
    if len(llm) >= 2:
        out["prefill"] = llm[0]
        step = dict(llm[1])
        # a step also reads the KV cache so far: at the mean length of the bench's answers
        positions = answer.prompt_tokens + new_tokens // 2
        step["kv_bytes"] = 2 * decoder.layers * decoder.kv_heads * decoder.head_dim * positions * np.dtype(decoder.dtype).itemsize
        out["decode"] = step
    return out


def floors_ms(costs: dict, rates: Rates) -> dict:
    """Per stage: its FLOPs, bytes, the compute and memory times at the machine's rates, and the
    floor (the larger), in ms."""
    out = {}
    for stage, cost in costs.items():
        read = cost["weight_bytes"] + cost.get("kv_bytes", 0)
        compute = cost["flops"] / (rates.gemm_gflops * 1e9) * 1e3
        memory = read / (rates.bandwidth_gbs * 1e9) * 1e3
        out[stage] = {"gflop": cost["flops"] / 1e9, "mib_read": read / 2**20, "compute_ms": compute,
                      "memory_ms": memory, "floor_ms": max(compute, memory),
                      "bound": "compute" if compute >= memory else "memory"}
    return out


def best_rates(rates: Rates, results: list) -> Rates:
    """``rates`` raised to the best any probe around the repeats measured (``results``' probes): the
    floor is what this machine did at its best during the bench, not in the moment after it."""
    from ppllava.runtime.rate_probe import PROBE_REPEAT

    probed = [p for result in results for p in result.probes if p]
    if not probed:
        return rates
    gemm = max(rates.gemm_gflops, *(p["gemm_gflops"] for p in probed))
    bandwidth = max(rates.bandwidth_gbs, *(p["bandwidth_gbs"] for p in probed))
    return Rates(gemm, bandwidth, f"{rates.source}, and of {len(probed)} probes around the repeats (best of {PROBE_REPEAT} each)")


def _measured(run, stage: str) -> float | None:
    return run.ms_per_token if stage == "decode" else run.stages.get(stage)


def paired_ratios(values: list[float | None], probes: list[dict | None], stage: str, cost: dict) -> list[float] | None:
    """Per repeat: its time / its floor at the rates probed just before and just after it (the better
    of the two); None unless every repeat has both probes."""
    if len(probes) != len(values) + 1 or any(p is None for p in probes):
        return None
    ratios = []
    for i, value in enumerate(values):
        if not value:
            continue
        near = Rates(max(probes[i]["gemm_gflops"], probes[i + 1]["gemm_gflops"]),
                     max(probes[i]["bandwidth_gbs"], probes[i + 1]["bandwidth_gbs"]), "probes")
        ratios.append(value / floors_ms({stage: cost}, near)[stage]["floor_ms"])
    return ratios or None


def report(costs: dict, rates: Rates, results: list) -> dict:
    """The bench report's ``floors``: the rates, and per stage its costs, its floor at those rates and,
    per run (``results``: the bench's BackendResults, first questions), ``measured_over_floor``: the
    median of ``paired_ratios`` (also kept, as ``paired_per_repeat``) where the rate probes ran
    around every repeat (``paired`` says per run), else the median against the floor at ``rates``,
    which is also kept as ``measured_over_best_floor``."""
    stages = floors_ms(costs, rates)
    probes = {r.name: r.probes for r in results if r.probes}
    paired = {r.name: bool(r.probes) and all(p is not None for p in r.probes) for r in results}
    for stage, floor in stages.items():
        floor["measured_over_floor"], floor["measured_over_best_floor"], floor["paired_per_repeat"] = {}, {}, {}
        for result in results:
            values = [_measured(run, stage) for run in result.first]
            present = [v for v in values if v]
            if not present or floor["floor_ms"] <= 0:
                continue
            best = float(np.median(present)) / floor["floor_ms"]
            floor["measured_over_best_floor"][result.name] = floor["measured_over_floor"][result.name] = best
            ratios = paired_ratios(values, result.probes, stage, costs[stage]) if paired[result.name] else None
            if ratios:
                floor["paired_per_repeat"][result.name] = ratios
                floor["measured_over_floor"][result.name] = float(np.median(ratios))
    return {"rates": asdict(rates), "stages": stages, "probes": probes, "paired": paired}


def _span(values: list[float], unit: str, digits: int) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f} {unit}"


def format_lines(floors: dict) -> list[str]:
    """The table's floor section."""
    r = floors["rates"]
    names = list(dict.fromkeys(n for f in floors["stages"].values() for n in f["measured_over_floor"]))
    lines = [f"floors: fp32 GEMM {r['gemm_gflops']:.0f} GFLOP/s, weight reads {r['bandwidth_gbs']:.1f} GB/s ({r['source']})",
             "        (the fp32 export's costs at these rates: a run at another precision can go below 1.0x)"]
    paired = {n: bool((floors.get("paired") or {}).get(n)) for n in names}
    probed = [p for run in (floors.get("probes") or {}).values() for p in run if p]
    if probed:
        lines.append(f"        each repeat / its floor at the rates probed just before and after it (a helper process; "
                     f"{len(probed)} probes: {_span([p['bandwidth_gbs'] for p in probed], 'GB/s', 1)}, "
                     f"{_span([p['gemm_gflops'] for p in probed], 'GFLOP/s', 0)}), median; in brackets: median / the floor above")
    unpaired = [n for n in names if not paired[n]]
    if floors.get("probes") and unpaired:
        lines.append(f"        (rate probes failed for {', '.join(unpaired)}: median / the floor above, marked *)")
    width = {n: max(14, len(n) + 8) + (9 if any(paired.values()) else 0) for n in names}
    lines.append(f"{'stage':<16}{'GFLOP':>10}{'MiB read':>10}{'floor ms':>10}  {'bound':<8}"
                 + "".join(f"  {n + ' / floor':>{width[n]}}" for n in names))

    def cell(f: dict, n: str) -> str:
        if n not in f["measured_over_floor"]:
            return f"  {'-':>{width[n]}}"
        text = f"{f['measured_over_floor'][n]:.2f}x"
        if n in f.get("paired_per_repeat", {}):
            text += f" ({f['measured_over_best_floor'][n]:.2f}x)"
        elif floors.get("probes"):
            text += "*"
        return f"  {text:>{width[n]}}"

    for stage, f in floors["stages"].items():
        label = "decode per token" if stage == "decode" else stage
        lines.append(f"{label:<16}{f['gflop']:>10.2f}{f['mib_read']:>10.1f}{f['floor_ms']:>10.2f}  {f['bound']:<8}"
                     + "".join(cell(f, n) for n in names))
    return lines
