"""Frames -> normalised model input, exactly as the manifest's preprocessing says."""

from __future__ import annotations

import numpy as np


def normalise(frames: np.ndarray, spec: dict) -> np.ndarray:
    """(T, S, S, 3) RGB (already resized) -> (T, 3, S, S) float32: rescale, then (x - mean) / std.

    uint8 frames go through a 256-entry table per channel computed by the same float32 formula, so
    the result is bit-identical to the arithmetic and ~6x faster (8 frames at 224 px: 5.4 -> 0.9 ms,
    OpenCV's LUT per frame, then one transposing copy)."""
    size = int(spec["size"])
    if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
        raise ValueError(f"frames must be (T, {size}, {size}, 3), got {frames.shape}")
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    if frames.dtype != np.uint8:
        x = (frames.astype(np.float32) * np.float32(spec["rescale"]) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    import cv2

    levels = np.arange(256, dtype=np.float32) * np.float32(spec["rescale"])
    table = ((levels[:, None] - mean) / std).reshape(1, 256, 3)
    out = np.empty((frames.shape[0], 3, size, size), np.float32)
    for t, frame in enumerate(frames):
        out[t] = cv2.LUT(np.ascontiguousarray(frame), table).transpose(2, 0, 1)
    return out
