"""Read-only, memory-mapped access to tensors in a safetensors file (numpy only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ppllava.errors import EngineError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> read-only memmap view; truncated or foreign files raise EngineError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 0 < n <= min(size - 8, 100 * 2**20) else None
    except (OSError, struct.error, ValueError) as exc:
        raise EngineError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise EngineError(f"{path} is not a safetensors file; re-export")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if 8 + n + end > size or info["dtype"] not in _DTYPES:
            raise EngineError(f"{path} is truncated or holds an unsupported dtype ({name}); re-export")
        out[name] = np.memmap(path, dtype=_DTYPES[info["dtype"]], mode="r", offset=8 + n + begin, shape=tuple(info["shape"]))
    return out
