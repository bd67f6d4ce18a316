"""Cross-architecture check of the torch-free runtime (driven by .ci/aarch64.sh).

    make-inputs DIR                 lossless synthetic inputs: DIR/clip.avi (OpenCV's PNG codec) + DIR/frame.png
    dump ENGINE --video V --image I --question Q --out F.npz
                                    stage outputs of the runtime's own Python API (torch-free: runs on the
                                    emulated aarch64 interpreter as well as on x86)
    compare ENGINE X86.npz ARM.npz [--ask-x86 A.json --ask-arm B.json]
                                    summary table; exit 1 with one line on a mismatch (runs on x86)

Tolerances (float32 everywhere; errors are max |x86 - aarch64| over the tensor, "rel" is that over max |x86|):

* vision features, text embedding, pool on identical inputs: rel <= 1e-4. The two builds of the same
  onnxruntime run different GEMM kernels (AVX2/AVX-512 FMA vs NEON FMA, other blockings, so other
  summation orders) and different vectorised exp/erf/tanh approximations. The rounding error of a
  length-K float32 dot product is typically sqrt(K) * 6e-8 relative and at most K * 6e-8; a few such
  layers at K <= 1024 stay around 1e-6 of the tensor's magnitude. 1e-4 leaves two orders of margin
  (about 800 ulps at the largest value), while a real defect (wrong op, layout, preprocessing or
  kernel) shows up as 1e-2..1. It is also the export's own fp32 parity bound.
* visual tokens end to end: their inputs already carry the vision/text differences, and the pooling
  softmax at temperature 0.01 multiplies similarity differences by 100. The amplification A of pool
  (relative output change per relative input change) is measured here on x86 by perturbing features
  and text embedding by one float32 ulp (per element, and +-1 ulp of the tensor's largest value on
  every element); the bound is (A + 1) * 1e-4: the inputs' 1e-4 budget carried through pool, plus
  pool's own 1e-4.
* LLM logits (every greedy step, teacher-forced on the x86 tokens): reported with the smallest top-1
  / top-2 margin; the hard check is that the token ids are identical.
* decoded frames, tokenizer ids and token ids must be identical; a lossless input decodes to the same
  bytes on both architectures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REL = 1e-4  # vision, text, pool on identical inputs (see the module docstring)
SEEDS = 4  # perturbation draws for the pool's amplification


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(out: Path) -> None:
    """A 24-frame 80x60 AVI with OpenCV's PNG codec and one PNG image, checked to decode losslessly."""
    import cv2

    out.mkdir(parents=True, exist_ok=True)
    h, w, n = 60, 80, 24
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        f = np.empty((h, w, 3), np.uint8)
        f[..., 0] = (xx * 3 + t * 7) % 256
        f[..., 1] = (yy * 4 + t * 11) % 256
        f[..., 2] = ((xx + yy) * 2 + t * 13) % 256
        cv2.circle(f, (8 + 3 * t, 20 + t), 9, (255, 255, 255), -1)
        cv2.rectangle(f, (60 - 2 * t, 35), (72 - 2 * t, 52), (0, 0, 0), -1)
        frames.append(f)
    video = out / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"png "), 8.0, (w, h))
    if not writer.isOpened():
        sys.exit("aarch64 check: OpenCV cannot write an AVI with the PNG codec here")
    for f in frames:
        writer.write(f)
    writer.release()
    cap = cv2.VideoCapture(str(video))
    decoded = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        decoded.append(f)
    cap.release()
    if len(decoded) != n or any(not np.array_equal(a, b) for a, b in zip(decoded, frames)):
        sys.exit(f"aarch64 check: {video} does not decode losslessly ({len(decoded)}/{n} frames)")
    image = out / "frame.png"
    cv2.imwrite(str(image), frames[n // 2])
    if not np.array_equal(cv2.imread(str(image)), frames[n // 2]):
        sys.exit(f"aarch64 check: {image} does not read back losslessly")
    print(f"{video} ({n} frames {w}x{h}, PNG codec, lossless), {image}")


# -------------------------------------------------------------------------------------------- dump
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("ppllava", "numpy", "onnxruntime", "opencv-python-headless", "pillow", "tokenizers", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def dump(args) -> None:
    from ppllava.runtime.pipeline import Pipeline
    from ppllava.runtime.preprocess import normalise
    from ppllava.runtime.prompt import check_question
    from ppllava.runtime.video import load_clip

    pipe = Pipeline.open(args.engine, threads=args.threads)
    pipe.tokenizers.require()
    spec = pipe.manifest.data["preprocessing"]
    frames = int(spec["default_frames"])
    question = check_question(args.question)
    arrays: dict[str, np.ndarray] = {}
    for name, path in (("video", args.video), ("image", args.image)):
        if path is None:
            continue
        clip = load_clip(path, frames, int(spec["size"]))  # what video_features decodes, kept for the frame check
        features, media, count, _ = pipe.video_features(path, frames)  # the runtime's own decode + vision path
        clip_ids, clip_mask = pipe.tokenizers.alignment_ids(question)
        text = pipe.text(clip_ids, clip_mask)
        plan = pipe.manifest.plan(media)
        visual = pipe.pool(features, text, plan, media)
        input_ids = pipe.tokenizers.prompt_ids([(question, None)])
        result = pipe.generate_ids(None, clip_ids, input_ids, clip_mask, args.max_new_tokens, media, plan,
                                   features=features)
        tokens = result.token_ids
        # The logits along that path, step by step, through the runtime's one generation loop.
        embeds = pipe.embed_prompt(input_ids, visual)
        logits = pipe.decoder.forced_logits(pipe.prompt(input_ids, visual), tokens)
        arrays.update({
            f"{name}/frames": clip.frames, f"{name}/pixels": normalise(clip.frames, spec),
            f"{name}/features": features, f"{name}/clip_ids": clip_ids, f"{name}/text": text,
            f"{name}/visual": visual, f"{name}/input_ids": input_ids, f"{name}/embeds": embeds,
            f"{name}/logits": np.stack(logits), f"{name}/tokens": np.asarray(tokens, np.int64),
            f"{name}/media": np.array(media),
        })
    meta = {"machine": platform.machine(), "python": platform.python_version(), "versions": _versions(),
            "qemu_cpu": os.environ.get("QEMU_CPU"), "threads": args.threads}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(args.out, **arrays)
    print(f"{meta['machine']}: wrote {args.out} ({', '.join(sorted({k.split('/')[0] for k in arrays if '/' in k}))})")


# ----------------------------------------------------------------------------------------- compare
def _err(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float(np.abs(a).max()), float("inf")
    scale = float(np.abs(a).max())
    err = float(np.abs(a - b).max()) if a.size else 0.0
    return err, scale, err / scale if scale else (0.0 if err == 0 else float("inf"))


def _amplification(pipe, features, text, plan, media) -> tuple[float, float]:
    """Relative change of pool's output per relative change of its inputs, measured with one-ulp
    perturbations (per element; and +-ulp(max|x|) on every element). Returns (per-element, of-max)."""
    rng = np.random.default_rng(0)
    base = pipe.pool(features, text, plan, media).astype(np.float64)
    scale = np.abs(base).max()
    worst = [0.0, 0.0]
    for _ in range(SEEDS):
        for mode in (0, 1):
            moved = []
            for x in (features, text):
                x = np.asarray(x, np.float32)
                sign = rng.choice(np.array([-1.0, 1.0], np.float32), size=x.shape)
                if mode == 0:
                    moved.append(np.nextafter(x, sign * np.float32(np.inf)).astype(np.float32))
                else:
                    top = np.abs(x).max()
                    step = np.spacing(np.float32(top))
                    moved.append((x + sign * step).astype(np.float32))
            rel_in = max(np.abs(m.astype(np.float64) - x).max() / np.abs(x).max()
                         for m, x in zip(moved, (features, text)))
            out = pipe.pool(moved[0], moved[1], plan, media).astype(np.float64)
            rel_out = np.abs(out - base).max() / scale
            worst[mode] = max(worst[mode], rel_out / rel_in)
    return worst[0], worst[1]


def _margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


def compare(args) -> int:
    from ppllava.runtime.pipeline import Pipeline

    x86, arm = np.load(args.x86), np.load(args.arm)
    meta_x, meta_a = json.loads(str(x86["meta"])), json.loads(str(arm["meta"]))
    pipe = Pipeline.open(args.engine, threads=meta_x["threads"])
    rows, failures = [], []

    def row(inp, stage, err, scale, rel, bound, ok, note=""):
        rows.append((inp, stage, err, scale, rel, bound, ok, note))
        if not ok:
            failures.append(f"{stage} ({inp}): {note or f'max abs {err:.3g}, rel {rel:.3g} > {bound}'}")

    for inp in ("video", "image"):
        if f"{inp}/frames" not in x86.files:
            continue
        get = lambda k: (x86[f"{inp}/{k}"], arm[f"{inp}/{k}"])  # noqa: E731
        fa, fb = get("frames")
        levels = int(np.abs(fa.astype(np.int16) - fb.astype(np.int16)).max()) if fa.shape == fb.shape else 255
        row(inp, f"decoded frames {tuple(fa.shape)}", levels, 255, levels / 255, "exact", levels == 0,
            "" if levels == 0 else f"decoded frames differ by up to {levels} uint8 levels (input not lossless?)")
        for key, label in (("clip_ids", "alignment token ids"), ("input_ids", "prompt token ids")):
            a, b = get(key)
            same = a.shape == b.shape and np.array_equal(a, b)
            row(inp, label, 0 if same else 1, None, 0.0, "exact", same, "" if same else f"{label} differ")
        for key, label in (("pixels", "preprocessed pixels"), ("features", "vision features"),
                           ("text", "text embedding")):
            a, b = get(key)
            err, scale, rel = _err(a, b)
            row(inp, f"{label} {tuple(a.shape)}", err, scale, rel, f"{REL:.0e}", rel <= REL)
        media = str(x86[f"{inp}/media"])
        plan = pipe.manifest.plan(media)
        # pool's own kernels: x86 pool on the aarch64 features + text against the aarch64 pool
        own = pipe.pool(arm[f"{inp}/features"], arm[f"{inp}/text"], plan, media)
        err, scale, rel = _err(own, arm[f"{inp}/visual"])
        row(inp, "pool, same inputs", err, scale, rel, f"{REL:.0e}", rel <= REL)
        per_elem, of_max = _amplification(pipe, x86[f"{inp}/features"], x86[f"{inp}/text"], plan, media)
        amp = max(per_elem, of_max)
        bound = (amp + 1) * REL
        a, b = get("visual")
        err, scale, rel = _err(a, b)
        in_rel = max(_err(*get("features"))[2], _err(*get("text"))[2])
        row(inp, f"visual tokens {tuple(a.shape)}", err, scale, rel, f"{bound:.1e}", rel <= bound,
            f"A={amp:.3g} (ulp/elem {per_elem:.3g}, ulp of max {of_max:.3g}); expected rel ~{amp * in_rel:.1e}")
        ta, tb = get("tokens")
        la, lb = get("logits")
        n = min(len(la), len(lb))
        err, scale, rel = _err(la[:n], lb[:n])
        margin = _margin(la)
        ratio = f" = {margin / err:.0f}x the logit error" if err else ""
        row(inp, f"LLM logits, {len(la)} steps", err, scale, rel, "info", True,
            f"smallest top-1/top-2 gap (x86) {margin:.3g}{ratio}")
        same = ta.shape == tb.shape and np.array_equal(ta, tb)
        note = ""
        if not same:
            k = next((i for i in range(min(len(ta), len(tb))) if ta[i] != tb[i]), min(len(ta), len(tb)))
            note = (f"token ids differ at step {k}: x86 {ta.tolist()} vs aarch64 {tb.tolist()} "
                    f"(x86 margin there {_margin(la[k:k + 1]) if k < len(la) else float('nan'):.3g}, logit error {err:.3g})")
        row(inp, f"greedy token ids ({len(ta)})", 0 if same else 1, None, 0.0, "identical", same, note)

    if args.ask_x86 and args.ask_arm:
        ax, aa = (json.loads(Path(p).read_text()) for p in (args.ask_x86, args.ask_arm))
        same = ax["token_ids"] == aa["token_ids"]
        row("video", f"`ppllava ask --json` token ids ({len(ax['token_ids'])})", 0 if same else 1, None, 0.0,
            "identical", same, "" if same else f"ask --json token ids differ: x86 {ax['token_ids']} vs aarch64 {aa['token_ids']}")
        dumped = x86["video/tokens"].tolist()
        n = min(len(dumped), len(ax["token_ids"]))
        same = dumped[:n] == ax["token_ids"][:n] and n > 0
        row("video", "ask --json = stage dump (x86)", 0 if same else 1, None, 0.0, "identical", same,
            "" if same else "ask --json and the stage dump disagree on x86 (the dump no longer follows ask's path)")
        answer = aa.get("answer", "")

    print(f"x86:     {meta_x['machine']} python {meta_x['python']} onnxruntime {meta_x['versions']['onnxruntime']} "
          f"numpy {meta_x['versions']['numpy']} opencv {meta_x['versions']['opencv-python-headless']}")
    print(f"aarch64: {meta_a['machine']} python {meta_a['python']} onnxruntime {meta_a['versions']['onnxruntime']} "
          f"numpy {meta_a['versions']['numpy']} opencv {meta_a['versions']['opencv-python-headless']} "
          f"(qemu -cpu {meta_a['qemu_cpu'] or 'max'}, {meta_a['threads']} thread(s))")
    print(f"{'input':<6} {'stage':<34} {'max abs err':>11} {'max |x86|':>10} {'rel err':>9} {'bound':>9}  result")
    for inp, stage, err, scale, rel, bound, ok, note in rows:
        scale_s = f"{scale:10.3g}" if isinstance(scale, float) else f"{'':>10}"
        err_s = f"{err:11.3g}" if isinstance(err, float) else f"{err:>11}"
        rel_s = f"{rel:9.2e}" if isinstance(scale, float) else f"{'':>9}"
        print(f"{inp:<6} {stage:<34} {err_s} {scale_s} {rel_s} {bound:>9}  {'ok' if ok else 'MISMATCH'}"
              + (f"  {note}" if note and ok else ""))
    if args.ask_x86 and args.ask_arm:
        print(f"aarch64 answer (random tiny LLM, {len(aa['token_ids'])} tokens): {answer[:60]!r}{'...' if len(answer) > 60 else ''}")
    if failures:
        print(f"aarch64 check FAILED: {failures[0]}" + (f" (+{len(failures) - 1} more above)" if len(failures) > 1 else ""),
              file=sys.stderr)
        return 1
    print("aarch64 check passed: identical token ids, every stage within its bound")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-inputs")
    s.add_argument("dir", type=Path)
    s = sub.add_parser("dump")
    s.add_argument("engine", type=Path)
    s.add_argument("--video", type=Path)
    s.add_argument("--image", type=Path)
    s.add_argument("--question", required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=24)
    s = sub.add_parser("compare")
    s.add_argument("engine", type=Path)
    s.add_argument("x86", type=Path)
    s.add_argument("arm", type=Path)
    s.add_argument("--ask-x86", type=Path)
    s.add_argument("--ask-arm", type=Path)
    args = p.parse_args()
    if args.cmd == "make-inputs":
        make_inputs(args.dir)
        return 0
    if args.cmd == "dump":
        dump(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
