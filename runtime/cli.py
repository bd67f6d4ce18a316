"""``ppllava ask`` and ``ppllava chat``: parse, call the pipeline, print. Torch-free (``--reference``
imports the PyTorch reference lazily, and only then)."""

from __future__ import annotations

import contextlib
import json
import time
import sys
from pathlib import Path

from ppllava.errors import InputError
from ppllava.runtime.pipeline import BACKENDS, DEFAULT_MAX_NEW_TOKENS
from ppllava.runtime.video import MAX_SIDE


def _engine_or_url(text: str):
    """An engine dir, or (ask only) the URL of a `ppllava serve` server's OpenAI endpoint."""
    return text if text.startswith(("http://", "https://")) else Path(text)


def _common(p) -> None:
    p.add_argument("engine_dir", type=_engine_or_url, metavar="ENGINE_DIR",
                   help="engine dir; for ask also a server URL (http://host:8080 from `ppllava serve`)")
    p.add_argument("video", type=Path, help="video file (mp4, avi, mkv, webm, mov, ...) or an image")
    p.add_argument("--frames", type=int, help="frames to sample (default: the manifest's, 32 for released models)")
    p.add_argument("--start", type=float, help="window start in seconds")
    p.add_argument("--end", type=float, help="window end in seconds")
    p.add_argument("--tokens", type=int, help="visual-token budget (default: the checkpoint's pooling plan)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-side", type=int, help=f"refuse frames larger than this many pixels on a side (default {MAX_SIDE})")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="tensorrt: plans from build-engines for vision/text/pool; tensorrt-llm: also the LLM; "
                        "torch: AOTInductor stages from `export --torch` + static-cache LLM (CUDA graphs on a GPU)")
    p.add_argument("--providers", default="cpu", help="onnxruntime providers in order, e.g. cuda,cpu")
    p.add_argument("--threads", type=int, help="intra-op threads per stage")
    p.add_argument("--precision", help="the recorded variant to run: quantized stages or LLM (int8, fp8, int4) on "
                   "onnxruntime (default there, on the CPU provider: the int8 stages that passed `ppllava quantize`'s "
                   "threshold, dynamic method; the export's precision, fp32 or fp16, runs the exported ones), plan precision on tensorrt (default fp16), compiled "
                   "dtype on torch")
    p.add_argument("--cache-dir", type=Path, help="where vision features persist between runs (default: "
                   "$PPLLAVA_CACHE_DIR/features or ~/.cache/ppllava/features)")
    p.add_argument("--cache-size", type=float, default=4.0, help="disk cache cap in GiB (default 4)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the disk feature cache")


def _open(args):
    from ppllava.runtime.cache import default_cache_dir
    from ppllava.runtime.pipeline import Pipeline
    from ppllava.runtime.sampling import Sampling

    if args.frames is not None and args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    if args.cache_size <= 0:
        raise InputError(f"--cache-size must be > 0 GiB, got {args.cache_size} (use --no-cache to turn it off)")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    pipe = Pipeline.open(args.engine_dir, backend=args.backend, providers=args.providers, threads=args.threads,
                         precision=args.precision, cache_dir=cache_dir, cache_disk_bytes=int(args.cache_size * 2**30))
    return pipe, sampling


def timing_line(answer) -> str:
    ms = answer.timings.ms
    parts = [f"{k} {v:.0f} ms" for k, v in ms.items()]
    rate = answer.as_dict()["decode_tokens_per_s"]
    cached = " (vision cached)" if answer.cached else ""
    return (f"[{answer.frames} frames -> {answer.visual_tokens} visual tokens{cached}; " + ", ".join(parts)
            + (f"; {rate:.1f} tokens/s" if rate else "") + "]")


def cmd_ask(args) -> int:
    if args.reference and args.temperature > 0:
        raise InputError("--reference compares greedy answers; drop --temperature (or set it to 0)")
    from ppllava.runtime.prompt import check_question
    from ppllava.runtime.video import check_path

    check_question(args.question)  # checks that need no engine come before loading it (seconds, hundreds of MB)
    check_path(args.video)
    if isinstance(args.engine_dir, str):
        return _ask_server(args)
    pipe, sampling = _open(args)
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    answer = pipe.ask(args.video, args.question, frames=args.frames, start=args.start, end=args.end,
                      tokens=args.tokens, max_new_tokens=args.max_new_tokens, sampling=sampling,
                      max_side=args.max_side, on_text=stream)
    result = answer.as_dict()
    if args.reference:
        result["reference"] = _compare_with_reference(args, pipe, answer)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        print(timing_line(answer), file=sys.stderr)
        if args.reference:
            ref = result["reference"]
            verdict = "agrees" if ref["agrees"] else "DIFFERS"
            if ref.get("near_tie"):
                tie = ref["near_tie"]
                verdict += (f" up to a near-tie at token {tie['step']} (top-2 logit gap {tie['gap']:.2e}, within twice "
                            f"the rounding bound {tie['bound']:.2e}: either token is a correct float32 answer)")
            print(f"reference (PyTorch): {verdict}: {ref['answer']!r}", file=sys.stderr)
    return 0 if not args.reference or result["reference"]["agrees"] else 1


def _ask_server(args) -> int:
    from ppllava.runtime.serving.client import ask_server

    if args.reference or args.backend != "onnxruntime" or args.precision:
        raise InputError("--reference, --backend and --precision choose what runs locally; the server runs what it was "
                         "started with")
    t0 = time.perf_counter()
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    result = ask_server(args.engine_dir, args.video, args.question, on_text=stream, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, frames=args.frames,
                        start=args.start, end=args.end, tokens=args.tokens)
    result["wall_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        usage = result["usage"] or {}
        print()
        print(f"[{args.engine_dir}: {usage.get('prompt_tokens', '?')} prompt tokens -> "
              f"{usage.get('completion_tokens', '?')} new, {result['wall_ms']:.0f} ms]", file=sys.stderr)
    return 0


def _compare_with_reference(args, pipe, answer) -> dict:
    """Run the PyTorch reference on the same decoded frames (the only place the runtime touches torch)."""
    try:
        import torch
    except ImportError:
        raise InputError("--reference needs the PyTorch reference: pip install 'ppllava[export]'") from None

    from ppllava.model import PPLLaVA
    from ppllava.runtime.preprocess import normalise
    from ppllava.runtime.video import load_clip

    spec = pipe.manifest.data["preprocessing"]
    clip = load_clip(args.video, answer.frames, int(spec["size"]), args.start, args.end)
    pixels = torch.from_numpy(normalise(clip.frames, spec))
    model = PPLLaVA.from_pretrained(args.reference)
    tok = pipe.tokenizers
    input_ids = tok.prompt_ids([(args.question.strip(), None)])
    clip_ids, clip_mask = tok.alignment_ids(args.question.strip())
    plan = None
    if args.tokens:
        from ppllava.plan import plan_for_budget

        plan = plan_for_budget(args.tokens, (answer.frames, *pipe.manifest.grid))
    new = model.generate(torch.from_numpy(input_ids), pixel_values=pixels, clip_ids=torch.from_numpy(clip_ids),
                         clip_mask=None if clip_mask is None else torch.from_numpy(clip_mask),
                         media_type=clip.media_type, max_new_tokens=len(answer.token_ids), plan=plan)[0].tolist()
    result = {"token_ids": new, "answer": tok.decode([t for t in new if t not in pipe.eos_token_ids]).strip(),
              "agrees": new == answer.token_ids}
    if not result["agrees"]:
        result["near_tie"] = _near_tie(model, torch, input_ids, new, answer.token_ids, pixels, clip_ids, clip_mask,
                                       clip.media_type, plan)
        result["agrees"] = result["near_tie"] is not None
    return result


def _near_tie(model, torch, input_ids, reference, engine, pixels, clip_ids, clip_mask, media_type, plan) -> dict | None:
    """Where the two token lists first part: was the reference's choice a near-tie that rounding
    alone may decide either way (top-2 gap within twice its measured rounding bound)? Then both
    answers are correct float32 answers; returns that step, else None."""
    from ppllava.numerics import rounding_bound

    step = next((i for i, (a, b) in enumerate(zip(reference, engine)) if a != b), None)
    if step is None:  # one list is a prefix of the other: an end-of-sequence token decided
        step = min(len(reference), len(engine)) - 1
    prefix = torch.tensor([input_ids.reshape(-1).tolist() + reference[:step]])

    def logits(m, px):
        return m(prefix, pixel_values=px, clip_ids=torch.from_numpy(clip_ids),
                 clip_mask=None if clip_mask is None else torch.from_numpy(clip_mask), media_type=media_type,
                 plan=plan).logits[0, -1]

    with torch.no_grad():
        top2 = logits(model, pixels).topk(2).values
    gap = float(top2[0] - top2[1])
    bound = rounding_bound(logits, model, pixels, trials=2).value
    return {"step": step, "gap": gap, "bound": bound} if gap <= 2 * bound else None


def _line_editing() -> None:
    """Arrow keys, editing and a persistent question history for `chat` on a terminal (readline,
    where the Python build has it; piped input needs none)."""
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:
        return
    from ppllava.paths import cache_root

    history = cache_root() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    import atexit

    atexit.register(save)


def cmd_chat(args) -> int:
    """Questions about one video. Ctrl-C stops an answer (the session and its history stay), an
    empty line is ignored, Ctrl-D or /quit ends; a bad question is one line and the next one is asked."""
    from ppllava.runtime.video import check_path

    if isinstance(args.engine_dir, str):
        raise InputError("chat runs on an engine dir; for a server use `ppllava ask URL VIDEO QUESTION`")

    check_path(args.video)  # before the engine loads and before the first question is typed
    pipe, sampling = _open(args)
    options = dict(frames=args.frames, start=args.start, end=args.end, max_side=args.max_side)
    pipe.video_features(args.video, **options)  # decode + vision now: a non-video file fails here, and turns reuse it
    _line_editing()
    history: list[tuple[str, str]] = []
    print(f"Ask about {args.video.name} (Ctrl-C stops an answer; Ctrl-D or /quit ends).", file=sys.stderr)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            print(file=sys.stderr)
            continue
        if not question:
            continue
        if question in ("/quit", "/exit"):
            break
        answer = _chat_turn(pipe, question, history, args, options, sampling)
        if answer is not None:
            history.append((question, answer.text))
            used = answer.prompt_tokens + len(answer.token_ids)
            print(f"{timing_line(answer)} [context {used}/{pipe.context} tokens, {len(history)} turns]", file=sys.stderr)
    return 0


def _chat_turn(pipe, question, history, args, options, sampling):
    """One answer, streamed; the oldest turns are dropped while the conversation outgrows the context.
    None when the question is refused or the answer is stopped."""
    print("ppllava> ", end="", flush=True)
    while True:
        pieces = pipe.ask_stream(args.video, question, history=history, tokens=args.tokens,
                                 max_new_tokens=args.max_new_tokens, sampling=sampling, **options)
        try:
            for item in pieces:
                if isinstance(item, str):
                    print(item, end="", flush=True)
                else:
                    print()
                    return item
        except KeyboardInterrupt:
            pieces.close()  # cancels the generation and waits for it
            print("\n(answer stopped; not kept in the history)", file=sys.stderr)
            return None
        except InputError as exc:
            if "context" in str(exc) and history:
                history.pop(0)  # forget the oldest turn, try again
                print(f"(dropped the oldest turn to fit the context; {len(history)} kept)", file=sys.stderr)
                continue
            print(f"\n(error: {exc})", file=sys.stderr)
            return None


def cmd_bench(args) -> int:
    from ppllava.runtime import bench
    from ppllava.runtime.backends import BackendOptions, get_backend
    from ppllava.runtime.manifest import Manifest
    from ppllava.runtime.pipeline import Pipeline

    options = bench.BenchOptions(
        video=args.video, synthetic_frames=args.synthetic_frames, frames=args.frames, questions=args.questions,
        repeat=args.repeat, warmup=args.warmup, tokens=args.tokens, max_new_tokens=args.max_new_tokens,
    )
    if args.random_weights is None and args.engine_dir is None:
        raise InputError("give an ENGINE_DIR or --random-weights PRESET")
    if args.video is None and args.synthetic_frames is None:
        options.synthetic_frames = 8 if args.random_weights == "small" else 32
    options.validate()
    if args.plot:
        bench.require_plotting()  # (a broken install passes `requires`) refused before anything is measured
    for path in (args.json, args.plot):
        if path is not None and not path.parent.is_dir():
            raise InputError(f"{path}: the folder {path.parent} does not exist")
    backend = get_backend(args.backend)
    compare = _compare_list(args.compare)
    from ppllava.runtime.floors import check_rates

    check_rates(args.gemm_gflops, args.bandwidth_gbs)  # refused before anything is measured
    checkpoint = args.checkpoint
    engine_dir = args.engine_dir
    if args.random_weights:
        checkpoint, engine_dir = _random_engine(args.random_weights, backend.torch_stages,
                                                int8_vision=args.backend == "onnxruntime" and not args.no_int8_vision)
    variants = [c for c in compare if c != "torch"]
    if variants:  # refuse a missing variant before anything is measured (a peek: each run opens it checked)
        peek = Manifest.load(engine_dir, check_files=False)
        for precision in variants:
            backend(peek, BackendOptions(precision=precision))
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    want_floors = args.floors
    if want_floors and (why := _floors_skipped(engine_dir, args, compare)):
        say(f"floors: skipped ({why})")
        want_floors = False
    from ppllava.runtime.rate_probe import RateProbe

    # measured rates are probed again around every repeat (rate_probe.RateProbe); given ones stand
    probing = want_floors and args.gemm_gflops is None and args.bandwidth_gbs is None
    with (RateProbe(args.threads) if probing else contextlib.nullcontext()) as probe:
        providers = args.providers  # BackendOptions splits "cuda,cpu"
        memory = bench.HostMemory()  # each backend's window opens before it is: its weights count
        pipe = Pipeline.open(engine_dir, backend=args.backend, providers=providers, threads=args.threads)
        pipe.tokenizers.require()
        results = [bench.bench_pipeline(pipe, options, say, name=args.backend, memory=memory, probe=probe)]
        for precision in variants:
            memory = bench.HostMemory()
            variant = Pipeline.open(engine_dir, backend=args.backend, providers=providers, threads=args.threads,
                                    precision=precision)
            results.append(bench.bench_pipeline(variant, options, say, name=f"{args.backend}-{precision}",
                                                memory=memory, probe=probe))
            variant.close()
        if "torch" in compare:
            results.append(_torch_baseline(checkpoint or pipe.manifest.data["source"]["checkpoint"], pipe, options,
                                           args.torch_device, say, probe))
    # ratios are baseline / other: the torch reference where it ran, else the default run
    baseline = results[-1].name if "torch" in compare else results[0].name
    data = bench.report(engine_dir, options, results, baseline=baseline)
    if want_floors:
        data["floors"] = _floors(engine_dir, options, args, results, say, probing)
    print(bench.format_table(data))
    if args.json:
        bench.write_json(data, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(data, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


COMPARE = ("torch", "fp32", "fp16", "bf16", "int8", "fp8", "int4")


def _compare_list(value: str | None) -> list[str]:
    """--compare torch,fp32,int4: what runs beside the default, in that order (torch last)."""
    chosen = [v.strip() for v in (value or "").split(",") if v.strip()]
    unknown = [v for v in chosen if v not in COMPARE]
    if unknown:
        raise InputError(f"--compare takes a comma list of {', '.join(COMPARE)}; got {', '.join(unknown)}")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"--compare names a run twice: {value}")
    return sorted(chosen, key=lambda v: v == "torch")


def _floors_skipped(engine_dir, args, compare: list[str]) -> str | None:
    """Why floors would not mean anything for this bench, or None."""
    from ppllava.runtime.backends import BackendOptions
    from ppllava.runtime.manifest import Manifest

    cpu = (args.backend == "onnxruntime" and BackendOptions(args.providers).providers == ("cpu",)
           and ("torch" not in compare or args.torch_device == "cpu"))
    if not cpu:
        return "they are this CPU's, for onnxruntime on the CPU provider; other devices have their own"
    if not Manifest.load(engine_dir, check_files=False).exported("llm"):  # a peek: the bench opens it checked
        return "they are counted from one answer, and this engine has no ONNX LLM: --llm none"
    return None


def _floors(engine_dir, options, args, results: list, say, probed: bool) -> dict | None:
    """Each stage's floor on this machine (ppllava.runtime.floors), beside what every run measured;
    None (with a line saying why) where they cannot be counted. A failure here costs the floors
    only, never the measurements."""
    from ppllava.errors import PPLLaVAError
    from ppllava.runtime import bench, floors

    say("floors: measuring this machine's GEMM rate and memory bandwidth, and profiling the stages' costs")
    try:
        rates = floors.given_rates(args.gemm_gflops, args.bandwidth_gbs, lambda: floors.measure_rates(args.threads))
        video = options.video if options.video is not None else bench.synthetic_frames(options.synthetic_frames, seed=options.seed)
        costs = floors.stage_costs(engine_dir, video, bench.QUESTIONS[0], options.frames if options.video else None,
                                   options.tokens, args.threads, options.max_new_tokens)
    except PPLLaVAError as exc:
        say(f"floors: not measured ({exc})")
        return None
    if probed:
        rates = floors.best_rates(rates, results)
    return floors.report(costs, rates, results)


def _random_engine(preset: str, torch_stages: bool = False, int8_vision: bool = False):
    """Random-weight engines are built by the export side (torch), lazily and only on request."""
    from ppllava.export.bench_support import random_engine

    return random_engine(preset, report=lambda line: print(line, file=sys.stderr, flush=True), torch_stages=torch_stages,
                         int8_vision=int8_vision)


def _torch_baseline(checkpoint, pipe, options, device, say, probe=None):
    """The PyTorch eager baseline of --compare torch (imports torch, lazily and only on request)."""
    from pathlib import Path as _Path

    from ppllava.export.bench_torch import bench_torch

    if not _Path(checkpoint).is_dir():
        raise InputError(f"--compare torch needs the checkpoint ({checkpoint} does not exist); pass --checkpoint")
    return bench_torch(checkpoint, pipe, options, device, say, probe=probe)


def cmd_doctor(args) -> int:
    from ppllava.runtime.doctor import DoctorOptions, report

    options = DoctorOptions(backend=args.backend, precision=args.precision, frames=args.frames)
    if args.engine_dir is None and (args.precision or args.frames is not None):
        raise InputError("--precision and --frames size an engine: give its ENGINE_DIR")
    print("\n".join(report(args.engine_dir, options)))
    return 0


def cmd_check(args) -> int:
    """Torch-free integrity check after copying an engine dir: the manifest's schema, every path
    inside the dir, every file's size and sha256 (large ones included), with progress."""
    from ppllava.runtime.manifest import Manifest

    manifest = Manifest.load(args.engine_dir, check_files=False)
    last = [0.0]

    def progress(done, total, path):
        now = time.monotonic()
        if path is None or now - last[0] > 0.5:
            last[0] = now
            name = "done" if path is None else path.relative_to(manifest.root)
            print(f"\r  {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB  {name}\033[K", end="", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    summary = manifest.check_files(verify_checksums=True, progress=None if args.quiet else progress)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"{manifest.root}: ok, {summary['files']} files, {summary['bytes'] / 2**30:.2f} GiB match their sha256 "
          f"({time.monotonic() - t0:.1f} s)")
    return 0


def add_parsers(sub) -> None:
    from ppllava.runtime.serving.cli import add_parsers as add_serving_parsers

    add_serving_parsers(sub)  # triton-repo, serve

    p = sub.add_parser("check", help="verify an engine dir after copying it: manifest schema and every file's sha256")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("doctor", help="usable backends here, and whether an engine dir fits this machine / Jetsons")
    p.add_argument("engine_dir", type=Path, nargs="?")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="the backend whose memory to estimate")
    p.add_argument("--precision", help="the recorded variant it will run (as `ask --precision`)")
    p.add_argument("--frames", type=int, help="frames per video (default: the most the engine takes)")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("ask", help="answer a question about a video from an engine dir (no torch)")
    _common(p)
    p.add_argument("question")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, token ids, timings)")
    p.add_argument("--reference", type=Path, metavar="CHECKPOINT",
                   help="also run the PyTorch reference on the same frames and say whether the answers agree")
    p.set_defaults(handler=cmd_ask, requires=lambda a: [("torch", "ppllava[export]")] if a.reference else [])

    p = sub.add_parser("chat", help="several questions about one video; vision runs once")
    _common(p)
    p.set_defaults(handler=cmd_chat)

    p = sub.add_parser("bench", help="per-stage latency (min/median/p95, cold, follow-up), optionally against torch")
    p.add_argument("engine_dir", type=Path, nargs="?")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--video", type=Path)
    source.add_argument("--synthetic-frames", type=int, help="a generated clip of T frames (no video decoding cost)")
    p.add_argument("--frames", type=int, help="frames to sample from --video (default: the manifest's)")
    p.add_argument("--questions", type=int, default=2, help="questions per video: 1 first + N-1 follow-ups (default 2)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tokens", type=int, help="visual-token budget")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per question (end of text ignored)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--providers", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--compare", help="comma list of what else runs on the same inputs: torch (the PyTorch reference, "
                   "eager; the ratios' baseline), fp32/fp16/bf16 (the exported stages, without the int8 ones run by "
                   "default), int8, fp8, int4 (recorded variants); e.g. --compare fp32,torch")
    p.add_argument("--no-floors", dest="floors", action="store_false",
                   help="skip measuring this machine's GEMM rate and bandwidth and each stage's floor")
    p.add_argument("--gemm-gflops", type=float, help="this machine's fp32 GEMM rate for the floors (default: measured)")
    p.add_argument("--bandwidth-gbs", type=float, help="this machine's memory bandwidth for the floors (default: measured)")
    p.add_argument("--no-int8-vision", action="store_true",
                   help="--random-weights: do not build the int8 (dynamic) vision variant that ask runs by default")
    p.add_argument("--checkpoint", type=Path, help="checkpoint for --compare torch (default: the manifest's source)")
    p.add_argument("--torch-device", default="cpu", help="device for the torch baseline (cpu, cuda)")
    p.add_argument("--random-weights", choices=("small", "vicuna-7b", "qwen2-7b"),
                   help="build (or reuse) a random-weight engine at real shapes instead of ENGINE_DIR")
    p.add_argument("--json", type=Path, help="write the full report as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG chart: per stage p50 and p95 of each backend, with the "
                   "settings and the machine")
    p.set_defaults(handler=cmd_bench, requires=lambda a: (
        [("torch", "ppllava[export]")] if a.random_weights or "torch" in [c.strip() for c in (a.compare or "").split(",")] else [])
        + ([("matplotlib", "ppllava[bench]")] if a.plot else []))
