"""One served request: the tensors a Triton client sends, checked and turned into ``Pipeline.ask``
arguments. numpy only (no Triton import), so the main test suite checks every rule here.

A client sends exactly one of ``video`` (a path on the server, which must resolve inside one of the
allowed directories) or ``video_bytes`` (the file's content, written to a private temp file for the
duration of the request). Every refusal is an ``InputError`` whose one-line message names the input
and never a server path: it goes back to the client as it is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppllava.errors import InputError
from ppllava.runtime.sampling import Sampling

MAX_VIDEO_BYTES = 512 * 2**20  # an upload larger than this is refused before it is written

# name -> (Triton data type, optional); the order is the order of config.pbtxt.
INPUTS = {
    "question": ("TYPE_STRING", False),
    "video": ("TYPE_STRING", True),
    "video_bytes": ("TYPE_STRING", True),
    "history": ("TYPE_STRING", True),
    "max_new_tokens": ("TYPE_INT32", True),
    "temperature": ("TYPE_FP32", True),
    "top_p": ("TYPE_FP32", True),
    "seed": ("TYPE_INT32", True),
    "frames": ("TYPE_INT32", True),
    "start": ("TYPE_FP32", True),
    "end": ("TYPE_FP32", True),
    "tokens": ("TYPE_INT32", True),
}
# name -> (Triton data type, dims after the batch dimension)
OUTPUTS = {"answer": ("TYPE_STRING", "[ 1 ]"), "token_ids": ("TYPE_INT32", "[ -1 ]"),
           "timings": ("TYPE_STRING", "[ 1 ]")}
STREAM_OUTPUTS = {"text": ("TYPE_STRING", "[ 1 ]"), "token_ids": ("TYPE_INT32", "[ -1 ]"),
                  "timings": ("TYPE_STRING", "[ 1 ]")}


@dataclass
class ServeRequest:
    question: str
    video: Path | None = None  # a checked path under the allow-list
    video_bytes: bytes | None = None
    options: dict = field(default_factory=dict)  # keyword arguments for Pipeline.ask

    @contextmanager
    def video_file(self, upload_dir: Path):
        """The path to decode: the allowed path, or the upload in a temp file removed afterwards."""
        if self.video is not None:
            yield self.video
            return
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".bin", dir=upload_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.video_bytes)
            yield Path(name)
        finally:
            os.unlink(name)


def _one(name: str, value: np.ndarray):
    array = np.asarray(value)
    if array.size != 1:
        raise InputError(f"{name}: send one value per request (shape [1, 1]), got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(name: str, value, limit: int = 1 << 20) -> str:
    item = _one(name, value)
    raw = item if isinstance(item, bytes) else str(item).encode()
    if len(raw) > limit:
        raise InputError(f"{name}: {len(raw)} bytes is more than the {limit} allowed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name}: not valid UTF-8") from None


def _number(name: str, value, kind):
    item = _one(name, value)
    number = kind(item)
    if kind is float and not math.isfinite(number):
        raise InputError(f"{name}: must be a finite number, got {number}")
    return number


def _history(value) -> list[tuple[str, str]]:
    try:
        turns = json.loads(_text("history", value))
    except json.JSONDecodeError as exc:
        raise InputError(f"history: not JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(turns, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in turns):
        raise InputError('history: expected a JSON list of [question, answer] string pairs, e.g. [["q", "a"]]')
    return [(q, a) for q, a in turns]


def resolve_allowed(path: str, allow: list[Path]) -> Path:
    """``path`` resolved (symlinks followed), if it lies inside one of ``allow``; else a refusal
    that says neither the resolved path nor the allowed directories."""
    if not path or "\x00" in path:
        raise InputError("video: an empty or invalid path")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in allow):
        raise InputError("video: the path is outside the directories this server may read (see its --allow)")
    if not resolved.exists():
        raise InputError("video: no such file")
    if not resolved.is_file():
        raise InputError("video: not a regular file")
    return resolved


def parse_request(inputs: dict[str, np.ndarray], allow: list[Path]) -> ServeRequest:
    """``inputs``: input name -> the numpy array the client sent (only those it sent)."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; this model takes {list(INPUTS)}")
    if "question" not in inputs:
        raise InputError("question: missing")
    question = _text("question", inputs["question"]).strip()
    if not question:
        raise InputError("question: empty")
    has_path, has_bytes = "video" in inputs, "video_bytes" in inputs
    if has_path == has_bytes:
        raise InputError("send exactly one of video (a path on the server) or video_bytes (the file's content)")
    request = ServeRequest(question)
    if has_path:
        request.video = resolve_allowed(_text("video", inputs["video"], 4096), allow)
    else:
        item = _one("video_bytes", inputs["video_bytes"])
        content = item if isinstance(item, bytes) else bytes(item)
        if not content:
            raise InputError("video_bytes: empty")
        if len(content) > MAX_VIDEO_BYTES:
            raise InputError(f"video_bytes: {len(content)} bytes is more than the {MAX_VIDEO_BYTES} allowed")
        request.video_bytes = content
    options = request.options
    if "history" in inputs:
        options["history"] = _history(inputs["history"])
    for name in ("max_new_tokens", "frames", "tokens"):
        if name in inputs:
            options[name] = _number(name, inputs[name], int)
    for name in ("start", "end"):
        if name in inputs:
            options[name] = _number(name, inputs[name], float)
    sampling = {name: _number(name, inputs[name], float) for name in ("temperature", "top_p") if name in inputs}
    if "seed" in inputs:
        sampling["seed"] = _number("seed", inputs["seed"], int)
    if sampling:
        options["sampling"] = Sampling(**sampling)  # checks the ranges
    return request


def client_message(exc: BaseException, request: ServeRequest | None, upload: Path | None) -> str:
    """The one line a client sees for a refused request: no server paths, no newlines."""
    text = " ".join(str(exc).split())
    for path, name in ((upload, "video_bytes"), (request and request.video, "video")):
        if path is not None:
            text = text.replace(str(path), name).replace(path.name, name)
    return text or type(exc).__name__
