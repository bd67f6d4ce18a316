"""Video and image input with OpenCV: sample frames the way upstream does, seeking instead of
decoding everything, and fail with one clear line on anything that is not a usable video.

Frame indices and seconds are related by the container's average frame rate only while that is
true. Every sampled frame's presentation timestamp is checked against its index; on a
variable-frame-rate file (phones) they disagree, and sampling switches to timestamps: segment
centres in seconds, each taken by the frame whose timestamp is nearest, read by timestamp. Measured
on a 720p clip (OpenCV 5.0, 2 shared cores): grab() still decodes (1.4 ms/frame mp4v, 3.2 ms H.264;
read() 1.7 / 4.0 ms), while reading packets in OpenCV's raw mode costs 0.013 ms/frame, so the
timestamps of a whole file come from packets; constant-rate files never pay even that.
"""

from __future__ import annotations

import bisect
import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppllava.errors import InputError
from ppllava.runtime.host import usable_cores

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_SIDE = 4096  # larger frames are refused unless the caller raises the limit
SEQUENTIAL_GAP = 48  # below this many frames between samples, grabbing forward beats seeking
# A frame whose timestamp is further than this many frame intervals from index / fps means the
# average rate does not place frames (variable frame rate). Not 0.5: AVI files with B-frames report
# every frame one interval late (a decode timestamp), and that is still a constant rate.
TIMING_SLACK = 1.5
# Elementary streams carry no timestamps: FFmpeg invents them from a nominal rate (25 fps unless the
# stream says otherwise), so seconds in them are guesses. FFmpeg's raw demuxers all use this time
# base, which OpenCV's getter of CAP_PROP_POS_AVI_RATIO happens to return; the suffixes cover the rest.
RAW_STREAM_SUFFIXES = {".h264", ".264", ".avc", ".h265", ".265", ".hevc", ".mjpeg", ".mjpg", ".m1v", ".m2v",
                       ".mpv", ".vc1", ".cavs"}
RAW_TIME_BASE = 1 / 1_200_000


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, already resized to the model's input size
    media_type: str  # "video" | "image"
    indices: list[int]
    fps: float
    total_frames: int
    size: tuple[int, int]  # original (width, height)
    times: tuple[float, ...] = ()  # presentation timestamp (s) of each sampled frame, where the file has them


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


def sample_times(times: list[float], count: int, start: float | None = None, end: float | None = None) -> list[int]:
    """The same segment centres in seconds, for frames at ``times`` (sorted presentation timestamps):
    centre i = lo + seg * (i + 1/2) with seg = (hi - lo) / count, each taken by the frame inside
    [lo, hi] whose timestamp is nearest (the earlier on a tie). Returns positions in ``times``."""
    interval = times[-1] - times[-2] if len(times) > 1 else 0.0
    video_end = times[-1] + interval  # the last frame is shown for about one more interval
    lo = times[0] if start is None else start
    hi = video_end if end is None else min(end, video_end)
    if lo >= video_end:
        raise InputError(f"the window [{start}, {end}] s selects no frames of a {video_end:.2f} s video")
    first, stop = bisect.bisect_left(times, lo), bisect.bisect_right(times, hi)  # the frames inside
    if first == stop:  # the window falls between two frames: the one on screen during it
        log.warning("the window [%s, %s] s holds no frame of its own; taking the frame shown from %.3f s",
                    start, end, times[first - 1])
        return [first - 1] * count
    seg = (hi - lo) / count
    picks = []
    for i in range(count):
        centre = lo + seg * (i + 0.5)
        after = bisect.bisect_left(times, centre, first, stop)  # the first frame at or after the centre
        near = [k for k in (after - 1, after) if first <= k < stop]
        picks.append(min(near, key=lambda k: (abs(times[k] - centre), k)))
    return picks


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


@contextmanager
def _resizing(size: int, cv2):
    """``resize(frame) -> Future`` of ``_resize(frame, size, cv2)``, run on one worker thread so each
    frame is resampled while the next one decodes (OpenCV's decoding and Pillow's resampling both
    release the GIL); the same arrays as resizing in line. At most ``ahead`` decoded full-size frames
    wait for the worker, so memory stays T x S x S plus those. Measured on bigbuckbunny (720p, 32
    frames at 224 px, 2-core Xeon, 6 alternating runs, medians): load_clip 573 ms resizing in line
    (~240 ms of it resizing), 465 ms with the worker (0.81x), identical frames."""
    ahead = 2
    pool = ThreadPoolExecutor(1, thread_name_prefix="ppllava-resize")
    waiting: collections.deque[Future] = collections.deque()

    def resize(frame: np.ndarray) -> Future:
        future = pool.submit(_resize, frame, size, cv2)
        waiting.append(future)
        while waiting and (len(waiting) > ahead or waiting[0].done()):
            waiting.popleft().result()  # also raises what the worker raised
        return future

    try:
        yield resize
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stack(futures: list[Future]) -> np.ndarray:
    return np.stack([f.result() for f in futures])


def _check_size(width: int, height: int, path: Path, max_side: int) -> None:
    if max(width, height) > max_side:
        raise InputError(
            f"{path.name} is {width}x{height}; frames larger than {max_side} px on a side are refused "
            f"(downscale it first, e.g. ffmpeg -i in.mp4 -vf scale=1920:-2 out.mp4, or raise --max-side)"
        )


def resize_frames(frames_rgb: np.ndarray, size: int) -> np.ndarray:
    """Already-decoded RGB frames (T, H, W, 3) -> (T, size, size, 3), the same resampling as decoding,
    on up to one thread per usable core (Pillow releases the GIL: 8 frames 448 -> 224 px on 2 cores,
    15.1 -> 10.2 ms)."""
    from PIL import Image

    def one(frame):
        return np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))

    workers = min(usable_cores(), len(frames_rgb))
    if workers <= 1:
        return np.stack([one(f) for f in frames_rgb])
    with ThreadPoolExecutor(workers, thread_name_prefix="ppllava-resize") as pool:
        return np.stack(list(pool.map(one, frames_rgb)))


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
    with _opened(path, cv2) as capture:
        if not capture.isOpened():
            raise InputError(f"{path} has no video stream OpenCV can decode (an audio-only file, an unsupported "
                             "codec, or not a video)")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        _check_size(width, height, path, max_side)
        fps = capture.get(cv2.CAP_PROP_FPS)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if not fps or fps <= 0 or not np.isfinite(fps):
            log.warning("%s reports no frame rate; assuming 25 fps for --start/--end", path.name)
            fps = 25.0
        if (start is not None or end is not None) and _untimed(path, capture, cv2):
            log.warning("%s is a raw video stream without timestamps: its times assume the nominal %.3g fps, "
                        "so --start/--end are approximate (remux it into .mp4/.mkv with its real frame rate)",
                        path.name, fps)
        header_ok = total > 0 and not _count_too_low(capture, cv2, total)
    sampled = None
    if header_ok:
        sampled = _sample_by_index(path, cv2, total, count, fps, start, end, size)
        if sampled is None:  # seeking failed, or a frame is not where index / fps puts it
            sampled = _sample_by_packet_times(path, cv2, total, count, fps, start, end, size)
    if sampled is None:
        total, sampled = _sample_by_decoding(path, cv2, total, count, fps, start, end, size)
    frames, indices, times = sampled
    times = () if None in times else tuple(times)  # a broken frame has no timestamp
    distinct = len(set(indices))
    if distinct < len(indices):
        log.warning("%s: the window holds %d distinct frame(s), so %d of the %d sampled frames repeat them",
                    path.name, distinct, len(indices) - distinct, len(indices))
    return Clip(frames, "video", indices, float(fps), total, (width, height), times)


@contextmanager
def _opened(path: Path, cv2):
    capture = cv2.VideoCapture(str(path))
    try:
        yield capture
    finally:
        capture.release()


def _sample_by_index(path, cv2, total, count, fps, start, end, size):
    """The fast path: seek to upstream's sampled indices. None unless every frame read has the
    timestamp its index / fps promises (a constant frame rate, at least where we looked)."""
    with _opened(path, cv2) as capture:
        read = _read_seeking(capture, cv2, total, count, fps, start, end, size)
    return read if read is not None and _drift(read[1], read[2], fps) <= TIMING_SLACK / fps else None


def _sample_by_packet_times(path, cv2, total, count, fps, start, end, size):
    """Variable frame rate: take every frame's timestamp from the packets, pick by seconds, read by
    timestamp. None where the packets cannot tell (then decoding decides)."""
    times = _packet_times(path, cv2, total)
    drift = None if times is None else _drift(range(total), times, fps)
    if drift is None or drift <= TIMING_SLACK / fps:
        return None  # a constant rate after all: the failure was not timing
    _warn_variable_rate(path, drift, fps)
    picks = sample_times(times, count, start, end)
    with _opened(path, cv2) as capture:
        return _read_at_times(capture, cv2, picks, times, fps, size)


def _sample_by_decoding(path, cv2, claimed, count, fps, start, end, size):
    """The container's frame count is missing or wrong (or seeking failed): count by decoding
    (keeping nothing but timestamps), then read the samples in one sequential pass."""
    with _opened(path, cv2) as capture:
        times = _decoded_times(capture, cv2)
    total = len(times)
    if total == 0:
        raise InputError(f"{path} has no decodable frames (empty, truncated or not a video)")
    if claimed > 0 and claimed != total:
        log.warning("%s claims %d frames but %d decode; sampling from the decodable ones", path.name, claimed, total)
    good = [i for i, t in enumerate(times) if t is not None]
    good_times = [times[i] for i in good]
    drift = _drift(good, good_times, fps)
    with _opened(path, cv2) as capture:
        if drift > TIMING_SLACK / fps:
            _warn_variable_rate(path, drift, fps)
            indices = [good[i] for i in sample_times(good_times, count, start, end)]
            frames, indices = _read_positions(capture, cv2, indices, size)
        else:
            frames, indices = _read_sequential(capture, cv2, total, count, fps, start, end, size)
    return total, (frames, indices, [times[i] for i in indices])


def _untimed(path: Path, capture, cv2) -> bool:
    """True for an elementary stream (raw .h264 and kin), whose timestamps FFmpeg makes up."""
    time_base = capture.get(cv2.CAP_PROP_POS_AVI_RATIO)  # see RAW_TIME_BASE
    return path.suffix.lower() in RAW_STREAM_SUFFIXES or abs(time_base - RAW_TIME_BASE) < 1e-12


def _drift(indices, times, fps: float) -> float:
    """Largest distance (s) between a frame's timestamp and index / fps. Frame 0 is skipped: it is the
    first frame whatever its stamp, and OpenCV reports a decode timestamp for a frame stamped 0."""
    return max((abs(t - i / fps) for i, t in zip(indices, times) if i > 0 and t is not None), default=0.0)


def _warn_variable_rate(path: Path, drift: float, fps: float) -> None:
    log.warning("%s has a variable frame rate (timestamps up to %.2f s away from its average %.3g fps): "
                "sampling by timestamps", path.name, drift, fps)


def _timestamp(capture, cv2) -> float:
    """Presentation timestamp (s, from the stream's start) of the frame grabbed last."""
    return capture.get(cv2.CAP_PROP_POS_MSEC) / 1000


def _read_seeking(capture, cv2, total, count, fps, start, end, size):
    """Read the sampled frames, seeking across large gaps; None if the stream does not deliver them.
    Returns (frames, indices, timestamps); the caller checks the timestamps."""
    indices = sample_indices(total, count, fps, start, end)
    frames, times, position = [], [], 0
    with _resizing(size, cv2) as resize:
        for index in indices:
            if frames and index == position - 1:  # the same frame again (short videos, many samples)
                frames.append(frames[-1])
                times.append(times[-1])
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
            frames.append(resize(frame))
            times.append(_timestamp(capture, cv2))
        return _stack(frames), indices, times


def _packet_times(path: Path, cv2, total: int) -> list[float] | None:
    """Presentation timestamps (s) of every frame, from the demuxed packets (OpenCV's raw mode decodes
    nothing); None where raw mode is unavailable or the packets are not one per claimed frame."""
    with _opened(path, cv2) as capture:
        if not capture.set(cv2.CAP_PROP_FORMAT, -1):
            return None
        times = []
        while capture.grab():
            times.append(_timestamp(capture, cv2))
    return sorted(times) if len(times) == total else None  # packets come in decode order


def _read_at_times(capture, cv2, picks, times, fps, size):
    """Read the frames at positions ``picks`` of the sorted timestamps ``times``, seeking by time
    across large gaps; None if the stream does not deliver them. Returns (frames, picks, timestamps)."""
    frames, current = [], None  # current: timestamp of the frame grabbed last
    with _resizing(size, cv2) as resize:
        for n, pick in enumerate(picks):
            if n and pick == picks[n - 1]:  # the same frame again (short windows, many samples)
                frames.append(frames[-1])
                continue
            target = times[pick]
            if current is None or current > target or pick - bisect.bisect_right(times, current) > SEQUENTIAL_GAP:
                current = _seek_before(capture, cv2, target, fps)
                if current is None:
                    return None
            while current < target:
                if not capture.grab():
                    return None
                current = _timestamp(capture, cv2)
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                return None
            frames.append(resize(frame))
        return _stack(frames), list(picks), [times[p] for p in picks]


def _seek_before(capture, cv2, target: float, fps: float) -> float | None:
    """Grab a frame at or before ``target`` seconds and return its timestamp (None: nothing decodes).

    OpenCV seeks frame numbers as seconds * average fps and then grabs forward counting frames, so on
    a variable rate it can land past the target (or past the end); each miss backs off further,
    down to the first frame, which it always finds."""
    back = 0
    while True:
        index = max(int(target * fps) - back, 0)
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        if capture.grab():
            landed = _timestamp(capture, cv2)
            if landed <= target or index == 0:
                return landed
        elif index == 0:
            return None
        back = max(2 * back, 16)


MAX_BROKEN_RUN = 16  # this many failed grabs in a row end the stream; fewer are broken frames


def _count_too_low(capture, cv2, total: int) -> bool:
    """True when a frame exists past the container's claimed count (a lying header)."""
    capture.set(cv2.CAP_PROP_POS_FRAMES, total)
    return bool(capture.grab())


def _decoded_times(capture, cv2) -> list[float | None]:
    """Timestamp (s) of each frame up to the last decodable one (None for a broken frame: isolated
    broken frames do not end the stream)."""
    times: list[float | None] = []
    last_good, failures = -1, 0
    while failures < MAX_BROKEN_RUN:
        if capture.grab():
            times.append(_timestamp(capture, cv2))
            last_good, failures = len(times) - 1, 0
        else:
            times.append(None)
            failures += 1
    return times[: last_good + 1]


def _read_sequential(capture, cv2, total, count, fps, start, end, size):
    indices = sample_indices(total, count, fps, start, end)
    return _read_positions(capture, cv2, indices, size)


def _read_positions(capture, cv2, indices, size):
    """Decode forward from the first frame, keeping the frames at the sorted positions ``indices``."""
    wanted = {}
    for i, index in enumerate(indices):
        wanted.setdefault(index, []).append(i)
    count = len(indices)
    frames: list = [None] * count  # futures of the resized frames
    position, last, failures = 0, None, 0
    with _resizing(size, cv2) as resize:
        while position <= indices[-1] and failures < MAX_BROKEN_RUN:
            ok = capture.grab()
            failures = 0 if ok else failures + 1
            if position in wanted:
                if ok:
                    ok, frame = capture.retrieve()
                    if ok and frame is not None:
                        last = resize(frame)
                for i in wanted[position]:
                    frames[i] = last  # a broken frame repeats the previous good one (None: filled below)
            position += 1
        if last is None:
            raise InputError("no sampled frame could be decoded")
        # Samples before the first good frame take the first good one; samples past where the
        # stream ended (a broken run at the tail) repeat the last good one, like a broken frame.
        previous = next(f for f in frames if f is not None)
        for i, frame in enumerate(frames):
            previous = frames[i] = frame if frame is not None else previous
        return _stack(frames), indices
