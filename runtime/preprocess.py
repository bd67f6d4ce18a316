"""Frames -> normalised model input, exactly as the manifest's preprocessing says (numpy only)."""

from __future__ import annotations

import numpy as np


def normalise(frames: np.ndarray, spec: dict) -> np.ndarray:
    """(T, S, S, 3) uint8 RGB (already resized) -> (T, 3, S, S) float32: rescale, then (x - mean) / std."""
    size = int(spec["size"])
    if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
        raise ValueError(f"frames must be (T, {size}, {size}, 3), got {frames.shape}")
    x = frames.astype(np.float32) * np.float32(spec["rescale"])
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
