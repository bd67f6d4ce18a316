"""``ppllava calibrate`` and ``ppllava quantize``: argument parsing only (no torch at import)."""

from __future__ import annotations

import sys
from pathlib import Path

from ppllava.errors import InputError, require_writable


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_calibrate(args) -> int:
    from ppllava.calibration.dataset import build_calibration_set, list_videos

    questions = None
    if args.questions:
        if not args.questions.is_file():
            raise InputError(f"--questions {args.questions} does not exist")
        questions = [q.strip() for q in args.questions.read_text().splitlines() if q.strip()]
        if not questions:
            raise InputError(f"--questions {args.questions} holds no questions")
    if args.questions_per_video < 1:
        raise InputError(f"--questions-per-video must be >= 1, got {args.questions_per_video}")
    if args.frames is not None and args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    if not (args.engine_dir / "manifest.json").is_file():
        raise InputError(f"{args.engine_dir} is not an engine dir (calibration runs the runtime; export first)")
    videos = list_videos(args.videos)
    meta = build_calibration_set(args.engine_dir, videos, args.out, questions, args.questions_per_video,
                                 args.frames, progress=_say)
    counts = meta["counts"]
    print(f"calibration set {args.out}: {counts['videos']} videos, {counts['questions']} questions"
          f" ({counts['skipped']} unreadable videos skipped)")
    return 0


def _verdict(report: dict) -> str:
    return "BELOW (recorded anyway: --no-threshold)" if report["below_threshold"] else "passed"


def _quantize_requires(args) -> list[tuple[str, str]]:
    if args.llm and args.llm.startswith("ort_"):
        return [("torch", "ppllava[export]"), ("onnxruntime_genai", "ppllava[export]")]
    if args.llm:
        return [("torch", "ppllava[export]"), ("modelopt", "ppllava[quant]")]
    from ppllava.calibration.quantize import auto_method

    if (auto_method(args.precision) if args.method == "auto" else args.method) == "dynamic":  # onnxruntime's own
        return [("onnx", "ppllava[export]")]  # (a bad --method/--precision pair is refused by the command)
    return [("onnx", "ppllava[export]"), ("modelopt", "ppllava[quant]")]


def cmd_quantize(args) -> int:
    from ppllava.calibration.quantize import quantize_stages

    require_writable(args.engine_dir, f"quantize records its variants in {args.engine_dir}")
    if bool(args.stages) == bool(args.llm):
        raise InputError("give --stages vision,text,pool (ONNX Q/DQ) or --llm SCHEME (TensorRT-LLM checkpoint)")
    if args.llm:
        from ppllava.calibration.llm_quant import evidence_text, quantize_llm, quantize_ort_llm

        ort = args.llm.startswith("ort_")
        quantize = quantize_ort_llm if ort else quantize_llm
        report = quantize(args.engine_dir, args.calib, args.llm.removeprefix("ort_") if ort else args.llm,
                          progress=_say, enforce_thresholds=not args.no_threshold)
        where = (f"use it with --precision {args.llm.removeprefix('ort_')}" if ort
                 else f"TensorRT-LLM checkpoint recorded in the manifest (stages.llm.variants['tensorrt-llm:{args.llm}:checkpoint'])")
        print(f"{args.llm}: top-1 agreement {report['top1_agreement']:.4f} ({evidence_text(report)}; "
              f"threshold {report['threshold_top1']}), "
              f"identical greedy answers {report['identical_greedy_answers']:.2f} on {report['held_out_prompts']} "
              f"held-out prompts — {_verdict(report)}; {where}")
        return 0
    report = quantize_stages(args.engine_dir, args.calib, [s.strip() for s in args.stages.split(",") if s.strip()],
                             args.precision, progress=_say, enforce_thresholds=not args.no_threshold,
                             method=args.method)
    together = ", ".join(f"{stage} {method}" for stage, method in report["methods"].items())
    print(f"{'output':<16} {'cosine mean':>12} {'cosine min':>11} {'max abs err':>12}   ({report['precision']}: "
          f"{together}; {report['held_out_clips']} held-out clips)")
    for name in ("features", "text_embedding", "visual_tokens"):
        r = report[name]
        print(f"{name:<16} {r['cosine_mean']:>12.5f} {r['cosine_min']:>11.5f} {r['max_abs_error']:>12.4g}")
    verdict = _verdict(report)
    print(f"threshold: visual-token cosine >= {report['thresholds']['visual_tokens_cosine']} — {verdict}")
    if not report["below_threshold"] and report["method"] == "dynamic":
        print("ask, chat, bench and serve on onnxruntime (CPU) run these int8 stages by default; "
              "--precision fp32 runs the exported ones")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("calibrate", help="calibration set from videos, with the runtime's own preprocessing")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--videos", type=Path, required=True, help="a directory of videos or a file listing them")
    p.add_argument("--questions", type=Path, help="one question per line (default: built-in generic questions)")
    p.add_argument("--questions-per-video", type=int, default=2)
    p.add_argument("--frames", type=int, help="frames per clip (default: the manifest's)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("quantize", help="INT8/FP8 stages (onnxruntime dynamic or ModelOpt Q/DQ) or LLM, judged on held-out data")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--stages", help="comma list of vision,text,pool")
    p.add_argument("--llm", choices=("int8_sq", "int8_wo", "fp8", "int4_awq", "ort_int4", "ort_int8"),
                   help="quantize the language model: a TensorRT-LLM checkpoint, or (ort_*) an onnxruntime-genai "
                        "weight-only ONNX LLM for the CPU path")
    p.add_argument("--precision", default="int8", help="int8 or fp8")
    p.add_argument("--method", choices=("auto", "dynamic", "qdq"), default="auto",
                   help="stages: dynamic = onnxruntime per-channel INT8 weights (fastest on the onnxruntime CPU path, "
                        "no calibration needed); qdq = ModelOpt explicit Q/DQ, calibrated (what build-engines needs for "
                        "TensorRT); auto = dynamic for int8, qdq for fp8")
    p.add_argument("--no-threshold", action="store_true",
                   help="record the stages even below the accuracy threshold (for latency measurements; marked in the manifest)")
    p.set_defaults(handler=cmd_quantize, requires=_quantize_requires)
