"""Video and image input with OpenCV: sample frames the way upstream does, seeking instead of
decoding everything, and fail with one clear line on anything that is not a usable video.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppllava.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_SIDE = 4096  # larger frames are refused unless the caller raises the limit
SEQUENTIAL_GAP = 48  # below this many frames between samples, grabbing forward beats seeking


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, already resized to the model's input size
    media_type: str  # "video" | "image"
    indices: list[int]
    fps: float
    total_frames: int
    size: tuple[int, int]  # original (width, height)


def _cv2():
    import os

    # FFmpeg inside OpenCV prints its own complaints ("moov atom not found") to stderr; our errors say
    # it in one line instead. Read when OpenCV's FFmpeg backend starts, so set before the import.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    try:
        import cv2
    except ImportError:
        raise InputError("OpenCV is not installed: pip install 'ppllava[runtime]'") from None
    return cv2


def sample_indices(total: int, count: int, fps: float, start: float | None = None, end: float | None = None) -> list[int]:
    """Upstream's segment centres: seg = (end - start) / count, frame i = int(start + seg/2 + round(seg * i))."""
    max_frame = total - 1
    first = 0 if start is None else max(0, round(start * fps))
    last = max_frame if end is None else min(round(end * fps), max_frame)
    if last < first:
        raise InputError(f"the window [{start}, {end}] s selects no frames of a {total / fps:.2f} s video")
    seg = (last - first) / count
    return [min(int(first + seg / 2 + np.round(seg * i)), max_frame) for i in range(count)]


def _resize(frame_bgr: np.ndarray, size: int, cv2) -> np.ndarray:
    """BGR frame -> (size, size, 3) RGB, bicubic without keeping the aspect ratio, as upstream.

    Resized immediately, so memory stays T x S x S. Pillow does the resampling: upstream's
    preprocessing is transformers' image processor, which resizes with Pillow's antialiased bicubic;
    OpenCV's bicubic has no antialiasing and differs by up to 83 uint8 levels on a 720p frame
    (INTER_AREA: 19), while Pillow matches it exactly.
    """
    from PIL import Image

    rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def _check_size(width: int, height: int, path: Path, max_side: int) -> None:
    if max(width, height) > max_side:
        raise InputError(
            f"{path.name} is {width}x{height}; frames larger than {max_side} px on a side are refused "
            f"(downscale it first, e.g. ffmpeg -i in.mp4 -vf scale=1920:-2 out.mp4, or raise --max-side)"
        )


def resize_frames(frames_rgb: np.ndarray, size: int) -> np.ndarray:
    """Already-decoded RGB frames (T, H, W, 3) -> (T, size, size, 3), the same resampling as decoding."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames_rgb])


def load_image(path: Path, size: int, max_side: int = MAX_SIDE) -> Clip:
    cv2 = _cv2()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{path} is not a readable image")
    height, width = image.shape[:2]
    _check_size(width, height, path, max_side)
    return Clip(_resize(image, size, cv2)[None], "image", [0], 0.0, 1, (width, height))


def check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a video file")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    return path


def load_clip(path: str | Path, count: int, size: int, start: float | None = None, end: float | None = None,
              max_side: int = MAX_SIDE) -> Clip:
    """Decode ``count`` frames of a video (or one image) resized to ``size`` x ``size`` RGB."""
    path = check_path(path)
    if count < 1:
        raise InputError(f"--frames must be >= 1, got {count}")
    import math

    if any(v is not None and not math.isfinite(v) for v in (start, end)):
        raise InputError(f"--start/--end must be finite numbers of seconds, got [{start}, {end}]")
    if start is not None and start < 0 or end is not None and end <= 0 or (start is not None and end is not None and end <= start):
        raise InputError(f"invalid time window [{start}, {end}] s (need 0 <= start < end)")
    if max_side < 1:
        raise InputError(f"--max-side must be >= 1, got {max_side}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if start is not None or end is not None:
            raise InputError(f"{path.name} is an image: --start/--end apply to videos only")
        return load_image(path, size, max_side)
    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InputError(f"{path} is not a readable video (OpenCV cannot open it)")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        _check_size(width, height, path, max_side)
        fps = capture.get(cv2.CAP_PROP_FPS)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if not fps or fps <= 0 or not np.isfinite(fps):
            log.warning("%s reports no frame rate; assuming 25 fps for --start/--end", path.name)
            fps = 25.0
        clip = None
        if total > 0 and not _count_too_low(capture, cv2, total):
            capture.release()
            capture = cv2.VideoCapture(str(path))
            clip = _read_seeking(capture, cv2, total, count, fps, start, end, size)
        if clip is None:
            # The container's frame count is missing or wrong (or seeking failed): count by decoding
            # (keeping nothing), then read the samples in one sequential pass.
            capture.release()
            capture = cv2.VideoCapture(str(path))
            claimed, total = total, _count_frames(capture)
            if total == 0:
                raise InputError(f"{path} has no decodable frames (empty, truncated or not a video)")
            if claimed and claimed != total:
                log.warning("%s claims %d frames but %d decode; sampling from the decodable ones", path.name, claimed, total)
            capture.release()
            capture = cv2.VideoCapture(str(path))
            clip = _read_sequential(capture, cv2, total, count, fps, start, end, size)
        frames, indices = clip
        return Clip(frames, "video", indices, float(fps), total, (width, height))
    finally:
        capture.release()


def _read_seeking(capture, cv2, total, count, fps, start, end, size):
    """Read the sampled frames, seeking across large gaps; None if the stream does not deliver them."""
    indices = sample_indices(total, count, fps, start, end)
    frames, position = [], 0
    for index in indices:
        if frames and index == position - 1:  # the same frame again (short videos, many samples)
            frames.append(frames[-1])
            continue
        if index < position or index - position > SEQUENTIAL_GAP:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
            position = index
        while position < index:
            if not capture.grab():
                return None
            position += 1
        ok, frame = capture.read()
        if not ok or frame is None:
            return None
        position += 1
        frames.append(_resize(frame, size, cv2))
    return np.stack(frames), indices


MAX_BROKEN_RUN = 16  # this many failed grabs in a row end the stream; fewer are broken frames


def _count_too_low(capture, cv2, total: int) -> bool:
    """True when a frame exists past the container's claimed count (a lying header)."""
    capture.set(cv2.CAP_PROP_POS_FRAMES, total)
    return bool(capture.grab())


def _count_frames(capture) -> int:
    """Frames up to the last decodable one; isolated broken frames do not end the count."""
    position = last_good = -1
    failures = 0
    while failures < MAX_BROKEN_RUN:
        position += 1
        if capture.grab():
            last_good, failures = position, 0
        else:
            failures += 1
    return last_good + 1


def _read_sequential(capture, cv2, total, count, fps, start, end, size):
    indices = sample_indices(total, count, fps, start, end)
    wanted = {}
    for i, index in enumerate(indices):
        wanted.setdefault(index, []).append(i)
    frames: list = [None] * count
    position, last, failures = 0, None, 0
    while position <= indices[-1] and failures < MAX_BROKEN_RUN:
        ok = capture.grab()
        failures = 0 if ok else failures + 1
        if position in wanted:
            if ok:
                ok, frame = capture.retrieve()
                if ok and frame is not None:
                    last = _resize(frame, size, cv2)
            for i in wanted[position]:
                frames[i] = last  # a broken frame repeats the previous good one (None: filled below)
        position += 1
    if last is None:
        raise InputError("no sampled frame could be decoded")
    # samples before the first good frame take the first good one
    first_good = next(f for f in frames if f is not None) if any(f is not None for f in frames) else last
    frames = [f if f is not None else first_good for f in frames]
    return np.stack(frames), indices
