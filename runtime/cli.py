"""``ppllava ask`` and ``ppllava chat``: parse, call the pipeline, print. Torch-free (``--reference``
imports the PyTorch reference lazily, and only then)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppllava.errors import InputError


def _common(p) -> None:
    p.add_argument("engine_dir", type=Path)
    p.add_argument("video", type=Path, help="video file (mp4, avi, mkv, webm, mov, ...) or an image")
    p.add_argument("--frames", type=int, help="frames to sample (default: the manifest's, 32 for released models)")
    p.add_argument("--start", type=float, help="window start in seconds")
    p.add_argument("--end", type=float, help="window end in seconds")
    p.add_argument("--tokens", type=int, help="visual-token budget (default: the checkpoint's pooling plan)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-side", type=int, help="refuse frames larger than this many pixels on a side (default 4096)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime",))
    p.add_argument("--providers", default="cpu", help="onnxruntime providers in order, e.g. cuda,cpu")
    p.add_argument("--threads", type=int, help="intra-op threads per stage")


def _open(args):
    from ppllava.runtime.pipeline import Pipeline
    from ppllava.runtime.sampling import Sampling

    if args.frames is not None and args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    return Pipeline.open(args.engine_dir, backend=args.backend, providers=providers, threads=args.threads), sampling


def timing_line(answer) -> str:
    ms = answer.timings.ms
    parts = [f"{k} {v:.0f} ms" for k, v in ms.items()]
    rate = answer.as_dict()["decode_tokens_per_s"]
    cached = " (vision cached)" if answer.cached else ""
    return (f"[{answer.frames} frames -> {answer.visual_tokens} visual tokens{cached}; " + ", ".join(parts)
            + (f"; {rate:.1f} tokens/s" if rate else "") + "]")


def cmd_ask(args) -> int:
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
            print(f"reference (PyTorch): {'agrees' if ref['agrees'] else 'DIFFERS'}: {ref['answer']!r}", file=sys.stderr)
    return 0 if not args.reference or result["reference"]["agrees"] else 1


def _compare_with_reference(args, pipe, answer) -> dict:
    """Run the PyTorch reference on the same decoded frames (the only place the runtime touches torch)."""
    import torch

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
    return {"token_ids": new, "answer": tok.decode([t for t in new if t not in pipe.eos_token_ids]).strip(),
            "agrees": new == answer.token_ids}


def cmd_chat(args) -> int:
    pipe, sampling = _open(args)
    history: list[tuple[str, str]] = []
    print(f"Ask about {args.video.name} (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        print("ppllava> ", end="", flush=True)
        try:
            answer = pipe.ask(args.video, question, history=history, frames=args.frames, start=args.start,
                              end=args.end, tokens=args.tokens, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, max_side=args.max_side,
                              on_text=lambda text: print(text, end="", flush=True))
        except InputError as exc:
            if not history:
                raise
            print(f"\n(error: {exc})", file=sys.stderr)
            continue
        print()
        print(timing_line(answer), file=sys.stderr)
        history.append((question, answer.text))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about a video from an engine dir (no torch)")
    _common(p)
    p.add_argument("question")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, token ids, timings)")
    p.add_argument("--reference", type=Path, metavar="CHECKPOINT",
                   help="also run the PyTorch reference on the same frames and say whether the answers agree")
    p.set_defaults(handler=cmd_ask)

    p = sub.add_parser("chat", help="several questions about one video; vision runs once")
    _common(p)
    p.set_defaults(handler=cmd_chat)
