"""--start/--end and frame sampling by presentation timestamps: variable-frame-rate files (phones),
raw streams without timestamps, and constant-rate files that must keep today's frames.

The videos are written here. OpenCV's writer only makes constant-rate files, so the MP4 it writes
gets its sample-duration table (stts) rewritten, which is where a phone's MP4 keeps its varying
frame durations. Every frame carries its own index as an 8-bit stripe code, so a test can tell
which frames came back and look up their true timestamps.
"""

from __future__ import annotations

import itertools
import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from ppllava.errors import InputError
from ppllava.runtime.video import _cv2, _sample_by_decoding, load_clip, sample_indices, sample_times

BITS, STRIPE, HEIGHT = 8, 16, 32  # frames are BITS stripes of STRIPE px, HEIGHT px tall
SIZE = BITS * 8  # load_clip's output size: 8 px per stripe
# The phone-style file of the user report: 30 fps for 2 s, then one frame every 0.5 s up to 10 s.
PHONE_TIMES = [i / 30 for i in range(60)] + [2 + 0.5 * k for k in range(17)]
PHONE_END = 10.5  # the last frame is shown for 0.5 s


def coded_frame(index: int) -> np.ndarray:
    bits = [(index >> b) & 1 for b in range(BITS)]
    row = np.repeat(np.array(bits, np.uint8) * 255, STRIPE)
    return np.repeat(np.repeat(row[None, :, None], HEIGHT, 0), 3, 2)  # (HEIGHT, BITS * STRIPE, 3)


def frame_codes(frames: np.ndarray) -> list[int]:
    """The index written into each returned (SIZE x SIZE) frame: the centre columns of each stripe."""
    centres = frames[:, :, 3::8, :].mean(axis=(1, 3))  # (T, BITS)
    return [int(sum(1 << b for b in range(BITS) if column[b] > 128)) for column in centres]


def write_mp4(path: Path, times: list[float], end: float) -> Path:
    """An MP4 whose frame i is stamped times[i] (and shown until the next one, the last until end)."""
    cfr = path.with_suffix(".cfr.mp4")
    writer = cv2.VideoWriter(str(cfr), cv2.VideoWriter_fourcc(*"mp4v"), 30, (BITS * STRIPE, HEIGHT))
    for i in range(len(times)):
        writer.write(coded_frame(i))
    writer.release()
    data = cfr.read_bytes()
    cfr.unlink()
    at = data.index(b"mdhd") + 4 + 12  # the track's timescale (ticks per second), version-0 mdhd
    scale = struct.unpack(">I", data[at : at + 4])[0]
    ticks = [round(t * scale) for t in [*times, end]]
    durations = [b - a for a, b in itertools.pairwise(ticks)]

    def rebuild(start: int, stop: int) -> bytes:
        out, pos = b"", start
        while pos < stop:
            size, kind = struct.unpack(">I4s", data[pos : pos + 8])
            body = data[pos + 8 : pos + size]
            if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"):
                body = rebuild(pos + 8, pos + size)
            elif kind == b"mdhd":  # the track's duration, in its timescale
                body = body[:16] + struct.pack(">I", ticks[-1] - ticks[0]) + body[20:]
            elif kind == b"stts":  # run-length (count, duration) pairs
                runs: list[list[int]] = []
                for d in durations:
                    if runs and runs[-1][1] == d:
                        runs[-1][0] += 1
                    else:
                        runs.append([1, d])
                body = body[:4] + struct.pack(">I", len(runs)) + b"".join(struct.pack(">II", *r) for r in runs)
            elif kind in (b"mvhd", b"tkhd", b"elst"):  # the movie-level durations, in ms (OpenCV's timescale)
                at = {b"mvhd": 16, b"tkhd": 20, b"elst": 8}[kind]
                body = body[:at] + struct.pack(">I", round((end - times[0]) * 1000)) + body[at + 4 :]
            out += struct.pack(">I4s", 8 + len(body), kind) + body
            pos += size
        return out

    assert data.index(b"moov") > data.index(b"mdat"), "moov after mdat: resizing it moves no sample"
    path.write_bytes(rebuild(0, len(data)))
    return path


@pytest.fixture(scope="module")
def phone_video(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("vfr") / "phone.mp4", PHONE_TIMES, PHONE_END)


@pytest.fixture(scope="module")
def constant_video(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("cfr") / "steady.mp4", [i / 30 for i in range(150)], 5.0)


def nearest_in_window(times, count, start, end):
    """Brute force of the rule: centre i of [start, end], taken by the nearest frame inside the window."""
    inside = [i for i, t in enumerate(times) if start <= t <= end]
    centres = [start + (end - start) * (i + 0.5) / count for i in range(count)]
    return [min(inside, key=lambda i: (abs(times[i] - c), i)) for c in centres]


def test_the_written_file_is_variable_rate(phone_video):
    # Bug class: a test video that is secretly constant-rate (the fix would be untested).
    capture = cv2.VideoCapture(str(phone_video))
    fps, total = capture.get(cv2.CAP_PROP_FPS), capture.get(cv2.CAP_PROP_FRAME_COUNT)
    stamps, codes = [], []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        stamps.append(capture.get(cv2.CAP_PROP_POS_MSEC) / 1000)
        codes.append(frame_codes(np.asarray([cv2.resize(frame, (SIZE, SIZE), interpolation=cv2.INTER_AREA)]))[0])
    capture.release()
    assert total == len(PHONE_TIMES) and abs(fps - len(PHONE_TIMES) / PHONE_END) < 1e-6
    np.testing.assert_allclose(stamps, PHONE_TIMES, atol=1e-3)
    assert codes == list(range(len(PHONE_TIMES)))


@pytest.mark.parametrize("start,end", [(3, 5), (0.5, 1.5), (1.5, 4.2)])
def test_window_on_variable_rate_video_takes_frames_inside_it(phone_video, caplog, start, end):
    # Bug class: seconds turned into indices with the average fps (7.33 here), so --start 3 --end 5
    # returned frames from 1.5-2 s; and OpenCV's own seek, which also counts in average-fps frames.
    with caplog.at_level(logging.WARNING, logger="ppllava.runtime.video"):
        clip = load_clip(phone_video, 4, SIZE, start, end)
    codes = frame_codes(clip.frames)
    true_times = [PHONE_TIMES[c] for c in codes]
    assert all(start <= t <= end for t in true_times), f"frames at {true_times} s for the window [{start}, {end}]"
    assert codes == nearest_in_window(PHONE_TIMES, 4, start, end) == clip.indices
    np.testing.assert_allclose(clip.times, true_times, atol=1e-3)
    assert sum("variable frame rate" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_the_reported_window(phone_video):
    # Bug class: the user report itself (frames at 1.53, 1.73, 1.93 and 3.5 s for --start 3 --end 5).
    codes = frame_codes(load_clip(phone_video, 4, SIZE, 3, 5).frames)
    assert [PHONE_TIMES[c] for c in codes] == [3.0, 3.5, 4.0, 4.5]


def test_whole_variable_rate_video_is_sampled_by_time(phone_video):
    # Bug class: segment centres placed by frame count, so 60 of 77 frames (the first 2 s) take most samples.
    clip = load_clip(phone_video, 8, SIZE)
    true_times = [PHONE_TIMES[c] for c in frame_codes(clip.frames)]
    centres = [PHONE_END * (i + 0.5) / 8 for i in range(8)]
    assert all(abs(t - c) <= 0.25 for t, c in zip(true_times, centres)), (true_times, centres)


def test_window_between_two_frames_takes_the_frame_on_screen(phone_video, caplog):
    # Bug class: a short window inside a 0.5 s gap selecting nothing, or a frame from outside it.
    with caplog.at_level(logging.WARNING, logger="ppllava.runtime.video"):
        clip = load_clip(phone_video, 3, SIZE, 3.1, 3.4)
    assert [PHONE_TIMES[c] for c in frame_codes(clip.frames)] == [3.0] * 3
    assert "holds no frame of its own" in caplog.text


@pytest.mark.parametrize("start,end", [(11, None), (10.6, 12), (10.5, None)])
def test_window_beyond_the_end_is_one_clear_error(phone_video, start, end):
    # Bug class: a window past the end answered with the last frames, or an error naming index maths.
    with pytest.raises(InputError, match=r"selects no frames of a 10\.50 s video") as error:
        load_clip(phone_video, 4, SIZE, start, end)
    assert "\n" not in str(error.value)


def test_decoding_path_samples_by_time_too(phone_video):
    # Bug class: the fallback for lying frame counts (count by decoding) still using the average fps.
    fps = len(PHONE_TIMES) / PHONE_END  # what OpenCV reports
    total, (frames, indices, times) = _sample_by_decoding(phone_video, _cv2(), 0, 4, fps, 3, 5, SIZE)
    assert total == len(PHONE_TIMES) and frame_codes(frames) == indices == [62, 63, 64, 65]
    np.testing.assert_allclose(times, [3.0, 3.5, 4.0, 4.5], atol=1e-3)


@pytest.mark.parametrize("count,start,end", [(8, None, None), (4, 1, 2), (6, 0.5, 4.9), (32, None, None), (3, 4.5, 9)])
def test_constant_rate_video_is_unaffected(constant_video, caplog, count, start, end):
    # Bug class: the timestamp checks changing which frames a constant-rate file gives, or warning on it.
    with caplog.at_level(logging.WARNING, logger="ppllava.runtime.video"):
        clip = load_clip(constant_video, count, SIZE, start, end)
    assert clip.indices == sample_indices(150, count, 30.0, start, end)
    assert frame_codes(clip.frames) == clip.indices
    np.testing.assert_allclose(clip.times, [i / 30 for i in clip.indices], atol=1e-3)
    assert not caplog.records, caplog.text


def test_raw_stream_says_its_window_is_approximate(tmp_path, caplog):
    # Bug class: an elementary stream (raw .h264, .mjpeg) whose times FFmpeg invents at 25 fps,
    # presented as exact seconds.
    path = tmp_path / "camera.mjpeg"
    path.write_bytes(b"".join(cv2.imencode(".jpg", coded_frame(i))[1].tobytes() for i in range(20)))
    with caplog.at_level(logging.WARNING, logger="ppllava.runtime.video"):
        load_clip(path, 4, SIZE)
    assert not caplog.records, caplog.text  # no window, nothing approximate
    with caplog.at_level(logging.WARNING, logger="ppllava.runtime.video"):
        clip = load_clip(path, 4, SIZE, 0.2, 0.6)
    warnings = [r.getMessage() for r in caplog.records if "without timestamps" in r.getMessage()]
    assert len(warnings) == 1 and "approximate" in warnings[0] and "\n" not in warnings[0], caplog.text
    assert frame_codes(clip.frames) == clip.indices == sample_indices(20, 4, 25.0, 0.2, 0.6)


def test_sample_times_rule():
    # Bug class: off-by-one at window edges and ties in the nearest-frame rule.
    times = [0.0, 1.0, 2.0, 3.0, 3.5, 4.0]
    assert sample_times(times, 2, 1.0, 3.0) == [1, 2]  # centres 1.5 and 2.5 are ties: the earlier frame
    assert sample_times(times, 4, 3.0, 4.0) == [3, 4, 4, 5]
    assert sample_times(times, 3) == [1, 2, 4]  # the whole clip, 0 to 4.5 s: centres 0.75, 2.25, 3.75
    assert sample_times(times, 1, 3.9, 10) == [5]  # the end is clamped to the video's
    with pytest.raises(InputError, match="selects no frames of a 4.50 s video"):
        sample_times(times, 2, 4.5)


def test_repeated_frames_and_audio_only_files_are_said(tmp_path, caplog):
    """A 1-frame video sampled at 8 frames says its frames repeat; a file with sound only says it
    has no video stream (not that OpenCV 'cannot open' it)."""
    import logging
    import wave

    import cv2

    from ppllava.errors import InputError
    from ppllava.runtime.video import load_clip

    one = tmp_path / "one.mp4"
    writer = cv2.VideoWriter(str(one), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    writer.write(np.full((48, 64, 3), 100, np.uint8))
    writer.release()
    with caplog.at_level(logging.WARNING, logger="ppllava.runtime.video"):
        clip = load_clip(one, 8, 32)
    assert clip.frames.shape[0] == 8
    assert any("1 distinct frame(s), so 7 of the 8 sampled frames repeat them" in r.getMessage() for r in caplog.records)
    sound = tmp_path / "voice.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(16000))
    with pytest.raises(InputError, match="no video stream"):
        load_clip(sound, 8, 32)


class _EndsEarly:
    """A capture whose frames ``good`` decode and whose stream then fails (a truncated tail); frame
    ``broken`` alone fails in the middle."""

    def __init__(self, good: int, broken: int):
        self.good, self.broken, self.position = good, broken, -1

    def grab(self) -> bool:
        self.position += 1
        return self.position < self.good and self.position != self.broken

    def retrieve(self):
        return True, coded_frame(self.position)


def test_samples_past_a_truncated_tail_repeat_the_last_good_frame():
    from ppllava.runtime.video import _read_positions

    # frames 0-9 decode except 4; everything from 10 on fails (more than MAX_BROKEN_RUN in a row)
    frames, _ = _read_positions(_EndsEarly(good=10, broken=4), cv2, [2, 4, 6, 9, 30, 60], SIZE)
    assert frame_codes(frames) == [2, 2, 6, 9, 9, 9]
