r"""Decode speed of the engine's onnxruntime LLM against llama.cpp on the same weights.

Usage (not run in CI; llama-cpp-python compiles llama.cpp natively, several minutes on 2 cores):

    python3.11 -m venv .venv-llamacpp
    mkdir -p .venv-llamacpp/src && .venv-llamacpp/bin/pip download llama-cpp-python==0.3.36 --no-deps \
        --no-binary :all: -d .venv-llamacpp/src && tar xzf .venv-llamacpp/src/llama_cpp_python-0.3.36.tar.gz \
        -C .venv-llamacpp/src
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        .venv-llamacpp/bin/pip install .venv-llamacpp/src/llama_cpp_python-0.3.36.tar.gz
    .venv-llamacpp/bin/pip install -e '.[export]' sentencepiece
    .venv-llamacpp/bin/python benchmarks/llamacpp_decode.py ~/.cache/ppllava/demo/engine \
        --json benchmarks/cpu-2core_decode_vs-llamacpp.json

On a CPU that reports AMX (an Intel Xeon of the 4th generation or later), a GGML_NATIVE build
compiles llama.cpp's AMX kernels, and on this project's Xeon VM the decode then died with SIGILL on
``tileloadd``, though the kernel granted the tile-data permission (arch_prctl); cause not found. There,
build without AMX and with the rest of the CPU's extensions named (AVX/AVX2/FMA/F16C/BMI2 are on by
default without GGML_NATIVE, and the AMX options off; named here to say what was built):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        .venv-llamacpp/bin/pip install --force-reinstall --no-deps .venv-llamacpp/src/llama_cpp_python-0.3.36.tar.gz

The engine's ``llm_hf/`` is converted with llama.cpp's own convert_hf_to_gguf.py (from the unpacked
sdist above, or ``--converter``) to an F32 GGUF, which llama.cpp's quantizer turns into Q8_0 and
Q4_0. Our side runs the engine's ONNX LLM at fp32 and its ``onnxruntime:int8``/``int4`` variants
(``ppllava quantize --llm ort_int8|ort_int4``), or, where the engine has none, the same builder
call (``build_onnx_llm`` with that precision) into the work dir; the engine dir is only read.
Both sides get the same prompt ids (text encoded by the engine's tokenizer, cut to
``--prompt-tokens``), generate ``--new-tokens`` greedily with end-of-sequence ignored, on
``--threads`` threads; the pairs run interleaved, ``--repeat`` times after ``--warmup``, and the
report gives medians: prefill ms, decode ms per token (decode time over new tokens - 1, as ``ppllava
bench``) and ours/llama.cpp. Our decoder is the runtime's ``OrtDecoder`` through its one
generation loop; llama.cpp's is llama-cpp-python's ``Llama.eval`` with greedy picks on its logits.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppllava.paths import cache_root

REPO = Path(__file__).resolve().parent.parent
# (ours, llama.cpp): same precision class of the weights
PAIRS = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
# a passage of ordinary English, repeated until the prompt has its length
PASSAGE = ("The river runs past the old mill, where the miller's children count the boats that pass each "
           "morning. In spring the water rises over the stones and the wheel turns faster; in autumn the leaves "
           "gather in the eddies and the town holds its market on the bridge. ")


class BenchError(Exception):
    """Reported as one line, without a traceback."""


@dataclass
class Side:
    label: str  # "onnxruntime int8", "llama.cpp Q8_0"
    weights: Path  # the file or directory measured
    run: object  # () -> (prefill s, decode s, tokens)
    source: str  # where the artifact came from


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", type=Path, help="an engine dir exported with an ONNX LLM")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "cpu-2core_decode_vs-llamacpp.json")
    p.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER, "
                   "else the one unpacked under .venv-llamacpp/src)")
    p.add_argument("--work", type=Path, help="where GGUFs and built ONNX variants are kept between runs "
                   "(default: $PPLLAVA_CACHE_DIR/llamacpp-decode/<engine>)")
    p.add_argument("--precisions", default="fp32,int8,int4", help=f"comma list of {', '.join(PAIRS)}")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rebuild", action="store_true", help="convert, quantize and build again (the work dir's files)")
    args = p.parse_args(argv)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    unknown = [s for s in args.precisions if s not in PAIRS]
    if unknown or not args.precisions:
        p.error(f"--precisions takes {', '.join(PAIRS)}, got {', '.join(unknown) or 'none'}")
    for name in ("prompt_tokens", "threads", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is per token after the first)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def find_converter(given: Path | None) -> Path:
    candidates = [given] if given else [Path(os.environ["LLAMA_CPP_CONVERTER"])] if os.environ.get(
        "LLAMA_CPP_CONVERTER") else sorted(REPO.glob(".venv-llamacpp/src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    for path in candidates:
        if path.is_file():
            return path
    raise BenchError(f"llama.cpp's convert_hf_to_gguf.py not found ({given or 'searched .venv-llamacpp/src'}): unpack "
                     "the llama-cpp-python sdist there (see this script's usage) or pass --converter")


def work_dir(args, manifest) -> Path:
    """One directory per engine export: a re-exported engine gets fresh conversions."""
    if args.work:
        return args.work
    key = hashlib.sha256(f"{args.engine.resolve()}|{manifest.data.get('created_at')}|"
                         f"{manifest.data['source'].get('fingerprint')}".encode()).hexdigest()[:12]
    return cache_root() / "llamacpp-decode" / f"{args.engine.resolve().name}-{key}"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- artifacts

def convert_f32(converter: Path, hf_dir: Path, out: Path, rebuild: bool) -> Path:
    if out.is_file() and not rebuild:
        return out
    say(f"converting {hf_dir} with {converter.name} (F32)")
    partial = out.with_suffix(".partial")
    done = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(partial), "--outtype", "f32"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {done.returncode}"
        hint = ("; it identifies a BPE tokenizer by the ids it gives a probe text, so a tokenizer it does not list (or one "
                "that prepends a BOS the original does not) is refused") if "pre-tokenizer was not recognized" in last else ""
        raise BenchError(f"{converter.name} refused {hf_dir}: {last}{hint}")
    partial.rename(out)
    return out


def quantize_gguf(llama_cpp, f32: Path, kind: str, threads: int, rebuild: bool) -> Path:
    out = f32.with_name(f"{kind.lower()}.gguf")
    if out.is_file() and not rebuild:
        return out
    say(f"quantizing {f32.name} to {kind} with llama.cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    partial = out.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        raise BenchError(f"llama.cpp's quantizer failed on {f32} ({kind}): status {status}")
    partial.rename(out)
    return out


def ort_llm(manifest, precision: str, work: Path, rebuild: bool) -> tuple[Path, str]:
    """(directory, where it came from) of our LLM at ``precision``."""
    from ppllava.runtime.manifest import variant_key

    if precision == "fp32":
        if manifest.stage("llm").get("precision") != "fp32":
            raise BenchError(f"{manifest.root}'s ONNX LLM is {manifest.stage('llm').get('precision')}, not fp32: export "
                             "with --dtype fp32 for this comparison")
        return manifest.stage_path("llm"), "engine llm/"
    record = manifest.stage_variant("llm", variant_key("onnxruntime", precision))
    if record is not None:
        return manifest.path(record), f"engine variant onnxruntime:{precision}"
    out = work / f"onnx-{precision}"
    if not (out / "genai_config.json").is_file() or rebuild:
        import shutil

        import torch

        from ppllava.export.llm import build_onnx_llm

        say(f"building the {precision} ONNX LLM with onnxruntime-genai's builder (as `ppllava quantize --llm ort_{precision}`)")
        logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # one INFO line per quantized MatMul otherwise
        partial = work / f".onnx-{precision}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_onnx_llm(manifest.root / manifest.data["llm"]["hf_dir"], partial, torch.float32, precision=precision)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out, f"built here with build_onnx_llm(precision={precision!r}) from llm_hf/"


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


# ---------------------------------------------------------------- the two decoders

def ours(llm_dir: Path, table: np.ndarray, ids: list[int], new_tokens: int, threads: int):
    """The runtime's decoder, opened as open_onnx_llm opens it, run by its one generation loop."""
    from ppllava.runtime.backends.onnxruntime import OrtDecoder
    from ppllava.runtime.generation import DECODE, PREFILL, Prompt
    from ppllava.runtime.pipeline import Timings
    from ppllava.runtime.sampling import Sampling, TokenSampler

    decoder = OrtDecoder(llm_dir, ("cpu",), threads, kv_in_place=True, embed_tokens=table)
    text = np.asarray(ids, np.int64)
    # a text-only prompt: the "visual" rows are the first token's own embedding, so the spliced
    # embeddings are exactly those of the ids llama.cpp gets
    prompt = Prompt(text_ids=text, image_pos=0, pads=np.zeros(text.shape, bool), visual=np.asarray(table[text[:1]]))
    greedy = TokenSampler(Sampling())

    def run():
        timings = Timings()
        tokens = decoder.generate(prompt, new_tokens, greedy, set(), ignore_eos=True, timings=timings)
        return timings.ms[PREFILL] / 1e3, timings.ms[DECODE] / 1e3, tokens

    return run


def llama(llama_cpp, gguf: Path, ids: list[int], new_tokens: int, threads: int):
    """llama-cpp-python's Llama, fed the same ids; greedy on the last position's logits, timed as
    StepDecoder.generate times ours (prefill: the prompt; decode: every pick and every later step)."""
    context = -(-(len(ids) + new_tokens) // 256) * 256
    try:
        model = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                n_batch=max(512, len(ids)), n_ubatch=max(512, len(ids)), logits_all=False, verbose=False)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"; llama.cpp's log says why
        raise BenchError(f"llama.cpp cannot load {gguf} ({exc}); an llm_hf/ exported before it carried complete "
                         "tokenizer files converts to more tokens than embedding rows: re-export the engine, or "
                         "pass --rebuild after fixing llm_hf/") from None
    vocab = model.n_vocab()

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,))

    def run():
        t0 = time.perf_counter()
        model.reset()
        model.eval(ids)
        last = logits()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = []
        while True:
            tokens.append(int(np.argmax(last)))
            if len(tokens) == new_tokens:
                break
            model.eval(tokens[-1:])
            last = logits()
        return prefill, time.perf_counter() - t0, tokens

    return run, model


# ---------------------------------------------------------------- report

def prompt_ids(manifest, count: int, vocab: int) -> tuple[list[int], str, str]:
    from tokenizers import Tokenizer

    rel = manifest.data["llm"].get("tokenizer")
    if not rel:
        raise BenchError(f"{manifest.root} has no LLM tokenizer, so there is no text prompt to give both sides")
    tokenizer = Tokenizer.from_file(str(manifest.root / rel))
    text, ids = PASSAGE, []
    while len(ids) < count:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        text += PASSAGE
    ids = ids[:count]
    if max(ids) >= vocab:
        raise BenchError(f"the engine's tokenizer gives id {max(ids)} for an LLM of {vocab} rows")
    return ids, tokenizer.decode(ids), rel


def machine_info(llama_cpp) -> tuple[dict, dict]:
    from importlib import metadata

    from ppllava.runtime.bench import machine, versions

    info = machine()  # with the CPU's id and kernel ISA extensions (bench.cpu_features)
    info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    found = versions()
    for dist in ("onnxruntime-genai", "llama_cpp_python", "transformers", "torch"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return info, found


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / tick, own.user + own.system


def median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise BenchError("llama_cpp is not installed: build llama-cpp-python into .venv-llamacpp (see the usage at the "
                         "top of benchmarks/llamacpp_decode.py) and run this script with .venv-llamacpp/bin/python") from None
    from ppllava.errors import PPLLaVAError
    from ppllava.runtime.manifest import Manifest
    from ppllava.runtime.tensors import map_safetensors

    try:
        manifest = Manifest.load(args.engine)
    except PPLLaVAError as exc:
        raise BenchError(str(exc)) from None
    if not manifest.exported("llm"):
        raise BenchError(f"{args.engine} has no ONNX LLM (exported with --llm none)")
    converter = find_converter(args.converter)
    work = work_dir(args, manifest)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = manifest.root / manifest.data["llm"]["hf_dir"]
    table = map_safetensors(manifest.root / manifest.data["llm"]["embeddings"])["embed_tokens"]
    ids, text, tokenizer_rel = prompt_ids(manifest, args.prompt_tokens, int(table.shape[0]))

    f32 = convert_f32(converter, hf_dir, work / "f32.gguf", args.rebuild)
    pairs, agrees = [], None
    for precision in args.precisions:
        kind = PAIRS[precision]
        gguf = f32 if kind == "F32" else quantize_gguf(llama_cpp, f32, kind, args.threads, args.rebuild)
        llm_dir, source = ort_llm(manifest, precision, work, args.rebuild)
        run_llama, model = llama(llama_cpp, gguf, ids, args.new_tokens, args.threads)
        if precision == args.precisions[0]:  # the converted tokenizer reads the text as ours does
            agrees = model.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
        pairs.append((precision, Side(f"onnxruntime {precision}", llm_dir, ours(llm_dir, table, ids, args.new_tokens,
                                                                                  args.threads), source),
                      Side(f"llama.cpp {kind}", gguf, run_llama, f"{converter.name} F32" +
                           ("" if kind == "F32" else f" -> llama_model_quantize {kind}"))))

    measured = {(p, side): [] for p, *_ in pairs for side in ("ours", "llama_cpp")}
    tokens = {}
    total = args.warmup + args.repeat
    for r in range(total):
        if r == args.warmup:
            started, wall = cpu_seconds(), time.perf_counter()
        for i, (precision, mine, theirs) in enumerate(pairs):
            order = [("ours", mine), ("llama_cpp", theirs)]
            if (r + i) % 2:
                order.reverse()  # neither side always runs first (turbo and cache state favour neither)
            for side, s in order:
                prefill, decode, got = s.run()
                tokens.setdefault((precision, side), got)
                if r >= args.warmup:
                    measured[(precision, side)].append((prefill * 1e3, decode * 1e3 / (args.new_tokens - 1)))
                time.sleep(0.2)  # the other library's worker threads settle
        say(f"{'warm-up' if r < args.warmup else 'repeat'} {r + 1 if r < args.warmup else r + 1 - args.warmup}/"
            f"{args.warmup if r < args.warmup else args.repeat} done")

    ended, wall = cpu_seconds(), time.perf_counter() - wall
    # CPU time other processes took while the repeats ran (steal included): a busy machine slows
    # llama.cpp's OpenMP barriers far more than it slows onnxruntime, so the ratios are only
    # meaningful when this is near 0
    elsewhere = (ended[0] - started[0]) - (ended[1] - started[1])
    machine, versions = machine_info(llama_cpp)
    machine["cpu_seconds_used_by_other_processes"] = round(elsewhere, 2)
    machine["cpu_seconds_available"] = round(wall * machine["cpu_usable"], 2)
    if elsewhere > 0.05 * wall * machine["cpu_usable"]:
        say(f"warning: other processes used {elsewhere:.1f} of {wall * machine['cpu_usable']:.1f} CPU seconds during the "
            "repeats: the machine was not quiet, rerun for numbers to keep")
    rows = []
    for precision, mine, theirs in pairs:
        row = {"precision": precision, "llama_cpp_type": PAIRS[precision]}
        for key, s in (("ours", mine), ("llama_cpp", theirs)):
            values = measured[(precision, key)]
            row[key] = {"artifact": str(s.weights), "source": s.source, "weights_mib": size_mib(s.weights),
                        "prefill_ms": [round(v[0], 3) for v in values],
                        "decode_ms_per_token": [round(v[1], 4) for v in values],
                        "prefill_ms_median": round(median([v[0] for v in values]), 3),
                        "decode_ms_per_token_median": round(median([v[1] for v in values]), 4)}
        row["ratio_ours_over_llama_cpp"] = {
            "prefill": round(row["ours"]["prefill_ms_median"] / row["llama_cpp"]["prefill_ms_median"], 3),
            "decode": round(row["ours"]["decode_ms_per_token_median"] / row["llama_cpp"]["decode_ms_per_token_median"], 3)}
        row["greedy_tokens_in_common"] = common_prefix(tokens[(precision, "ours")], tokens[(precision, "llama_cpp")])
        rows.append(row)
    report = {
        "what": "decode of the engine's onnxruntime LLM vs llama.cpp on the same weights (benchmarks/llamacpp_decode.py)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {"dir": str(args.engine), "fingerprint": manifest.data["source"].get("fingerprint"),
                   "created_at": manifest.data.get("created_at"), "llm_layers": manifest.dims.get("llm_layers"),
                   "llm_hidden": manifest.dims.get("llm_hidden"), "vocab_size": manifest.dims.get("vocab_size")},
        "settings": {"prompt_tokens": len(ids), "new_tokens": args.new_tokens, "threads": args.threads,
                     "repeat": args.repeat, "warmup": args.warmup, "sampling": "greedy, end-of-sequence ignored",
                     "order": "pairs interleaved, the side that runs first alternating", "statistic": "median",
                     "decode_ms_per_token": "decode time / (new_tokens - 1), the first token coming from the prefill",
                     "prompt": f"an English passage encoded by {tokenizer_rel}, cut to prompt_tokens",
                     "llama_cpp_tokenizer_agrees": agrees},
        "machine": machine,
        "versions": versions,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'precision':<10} {'prefill ms (ours / llama.cpp)':>30} {'ratio':>6}   {'decode ms/token (ours / llama.cpp)':>35} "
          f"{'ratio':>6}   same greedy tokens")
    for row in rows:
        o, t = row["ours"], row["llama_cpp"]
        print(f"{row['precision'] + '/' + row['llama_cpp_type']:<10} {o['prefill_ms_median']:>14.1f} / {t['prefill_ms_median']:<13.1f}"
              f" {row['ratio_ours_over_llama_cpp']['prefill']:>6.2f}   {o['decode_ms_per_token_median']:>17.2f} / "
              f"{t['decode_ms_per_token_median']:<15.2f} {row['ratio_ours_over_llama_cpp']['decode']:>6.2f}   "
              f"{row['greedy_tokens_in_common']}/{args.new_tokens}")
    print(f"{machine['cpu_model']}, {machine['cpu_usable']} usable cores, {args.threads} threads; results in {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # the project's own errors (builder, runtime) carry their values in one line
        if type(exc).__module__.split(".")[0] != "ppllava":
            raise
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        sys.exit(2)
