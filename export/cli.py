"""``ppllava export`` and ``ppllava verify``: argument parsing only; the work is in engine.py / verify.py.

Importing this module is cheap (no torch): the dispatcher builds every subcommand's parser.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ppllava.errors import PPLLaVAError, require_writable


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_export(args) -> int:
    from ppllava.export.engine import ExportOptions, export_engine

    if not args.torch and (args.torch_device != "auto" or args.torch_dtype != "auto"):
        raise PPLLaVAError("--torch-device / --torch-dtype only apply with --torch")
    require_writable(args.out.parent, f"--out {args.out}")  # the engine is built beside --out
    options = ExportOptions(
        checkpoint=args.checkpoint, out=args.out, dtype=args.dtype, max_frames=args.max_frames, llm=args.llm,
        force=args.force, alignment_config=args.alignment_config, alignment_dir=args.alignment_dir,
        template=args.template, verify=not args.no_verify, torch=args.torch, torch_device=args.torch_device,
        torch_dtype=args.torch_dtype,
    )
    manifest = export_engine(options, report=_say)
    rows = manifest.pop("_summary")
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'step':<{width}}  {'seconds':>8}  note")
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds:>8.1f}  {note}")
    total = sum(seconds for _, seconds, _ in rows)
    print(f"{'total':<{width}}  {total:>8.1f}  {args.out} ({_dir_size(args.out) / 2**20:.1f} MiB)")
    return 0


def cmd_verify(args) -> int:
    import json

    from ppllava.checkpoint import fingerprint
    from ppllava.export.verify import verify_engine
    from ppllava.model import PPLLaVA
    from ppllava.runtime.manifest import Manifest

    manifest = Manifest.load(args.engine_dir)
    require_writable(args.engine_dir, f"verify writes {args.engine_dir / 'verify.json'}")
    if fingerprint(args.checkpoint) != manifest.data["source"]["fingerprint"] and not args.any_checkpoint:
        raise PPLLaVAError(
            f"{args.checkpoint} is not the checkpoint {args.engine_dir} was exported from "
            f"({manifest.data['source']['checkpoint']}); pass --any-checkpoint to compare anyway"
        )
    model = PPLLaVA.from_pretrained(args.checkpoint, alignment_config=args.alignment_config)
    precision = manifest.stage("vision")["precision"]
    report = verify_engine(Path(args.engine_dir), model, precision, torch_required=False)
    for stage, checks in report["stages"].items():
        for label, errors in checks.items():
            print(f"{stage:<7} {label:<24} max abs {errors['max_abs']:.2e}  mean rel {errors['mean_rel']:.2e}")
    if report["end_to_end"]:
        e2e = report["end_to_end"]
        line = f"end to end: greedy tokens identical for {e2e['identical']} prompts"
        if e2e.get("agreeing"):
            line += f", agreeing at every decidable step for {e2e['agreeing']} ({e2e['decidable_steps']} steps decidable)"
        print(line)
    if report.get("torch", {}).get("skipped"):
        print(f"torch stages not checked here: {report['torch']['skipped']}")
    elif report.get("torch"):
        torch_report = report["torch"]
        for stage, checks in torch_report["stages"].items():
            for label, errors in checks.items():
                print(f"torch {stage:<7} {label:<24} max abs {errors['max_abs']:.2e}  mean rel {errors['mean_rel']:.2e}")
        if torch_report["end_to_end"]:
            e2e = torch_report["end_to_end"]
            print(f"torch end to end: greedy tokens identical for {e2e['identical']} prompts; "
                  f"top-1 agreement {e2e['top1_agreement']} along the reference's tokens")
    print(json.dumps({"verified": True, "precision": precision}))
    return 0


def cmd_build_engines(args) -> int:
    from ppllava.export import tensorrt

    if not args.workspace > 0:
        raise PPLLaVAError(f"--workspace must be > 0 GiB, got {args.workspace}")
    steps = tensorrt.build_plan(args.engine_dir, args.precision, args.max_frames, args.workspace)
    command = None
    if args.llm_scheme or args.dry_run:
        try:
            command = tensorrt.trtllm_build_command(args.engine_dir, args.llm_scheme, args.engine_dir / "trtllm_engine",
                                                    release=args.trtllm_release)
        except PPLLaVAError as exc:
            if args.llm_scheme:
                raise
            command = None
            print(f"(LLM: {exc})")
    if args.dry_run:
        print(f"would build (TensorRT, {args.precision}):")
        for step in steps:
            print(step.describe())
        if command:
            print("then the LLM:\n    " + tensorrt.format_command(command))
        return 0
    tensorrt.build_engines(args.engine_dir, args.precision, args.max_frames, args.workspace, report=_say)
    if command and args.llm_scheme:
        tensorrt.run_trtllm_build(args.engine_dir, args.llm_scheme, command, report=_say)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("build-engines", help="TensorRT engines (and the trtllm-build command) on the target GPU")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--precision", default="fp16", choices=("fp16", "int8", "fp8"))
    p.add_argument("--max-frames", type=int, help="largest clip in the optimisation profile (default: the export's)")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB")
    p.add_argument("--llm-scheme", help="also run trtllm-build on this TensorRT-LLM checkpoint (e.g. int8_sq)")
    p.add_argument("--trtllm-release", default="current", choices=("current", "jetson-v0.12"))
    p.add_argument("--dry-run", action="store_true", help="print exactly what would be built, with shapes and precision")
    p.set_defaults(handler=cmd_build_engines)

    p = sub.add_parser("export", help="checkpoint -> verified engine dir (ONNX stages + ONNX LLM)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="engine dir to create")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--max-frames", type=int, help="largest clip the vision stage accepts (default: max_T, or 64)")
    p.add_argument("--llm", choices=("onnx", "none"), default="onnx")
    p.add_argument("--force", action="store_true", help="replace an existing engine dir")
    p.add_argument("--alignment-config", type=Path, help="config.json of the alignment CLIP/SigLIP model")
    p.add_argument("--alignment-dir", type=Path, help="alignment model directory with its tokenizer (SigLIP)")
    p.add_argument("--template", default="auto", help="prompt template: auto, plain_v1 or plain_qwen")
    p.add_argument("--no-verify", action="store_true", help="skip the parity checks (not recommended)")
    p.add_argument("--torch", action="store_true",
                   help="also compile the stages with torch.export + AOTInductor (.pt2) for `--backend torch`")
    p.add_argument("--torch-device", default="auto", help="device the .pt2 stages are compiled for: auto, cpu, cuda")
    p.add_argument("--torch-dtype", default="auto",
                   help="dtype of the torch stages and LLM: auto (bf16 on a GPU, fp32 on CPU), fp32, fp16, bf16")
    p.set_defaults(handler=cmd_export, requires=lambda a: [("torch", "ppllava[export]"), ("onnx", "ppllava[export]"),
                                                           ("transformers", "ppllava[export]")])

    p = sub.add_parser("verify", help="rerun the export's parity checks on an existing engine dir")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--alignment-config", type=Path)
    p.add_argument("--any-checkpoint", action="store_true", help="skip the source fingerprint check")
    p.set_defaults(handler=cmd_verify, requires=lambda a: [("torch", "ppllava[export]"), ("onnx", "ppllava[export]")])
