"""Weight files of an upstream-layout checkpoint: find them, read their headers, load them strictly.

Header reading is torch-free (safetensors headers are JSON), so ``ppllava info`` can check a
checkpoint's keys and shapes without loading weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ppllava.errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's weight files, shards resolved through their index; errors name what is missing."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index: {exc}") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index.name} lists {len(shards)} shards but {len(missing)} are missing: {', '.join(missing[:4])}"
                )
            return [d / s for s in shards]
    files = sorted(d.glob("model*.safetensors")) or sorted(d.glob("*.safetensors"))
    if not files:
        files = sorted(d.glob("pytorch_model*.bin")) or sorted(d.glob("model*.bin"))
    if not files:
        raise CheckpointError(f"no weights in {d} (expected model.safetensors, shards with an index, or pytorch_model.bin)")
    return files


def fingerprint(checkpoint_dir: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A cheap identity for a checkpoint: config.json plus, per weight file, its size and
    ``samples`` chunks spread through it (hashing all of a 14 GB checkpoint would take minutes)."""
    import hashlib

    d = Path(checkpoint_dir)
    digest = hashlib.sha256((d / "config.json").read_bytes())
    for path in weight_files(d):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - chunk) * i // max(samples - 1, 1)))
                digest.update(f.read(chunk))
    return digest.hexdigest()


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors file's header; checks the file is not truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path} is not a safetensors file or is truncated (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, info in header.items():
        try:
            out[name] = (tuple(int(d) for d in info["shape"]), _SAFETENSORS_DTYPES.get(info["dtype"], str(info["dtype"])))
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header entry for {name!r})") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: the header promises {8 + n + end} bytes, the file has {size}")
    return out


def checkpoint_shapes(checkpoint_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) over all weight files (torch only for legacy .bin files)."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in weight_files(checkpoint_dir):
        if path.suffix == ".safetensors":
            shapes.update(safetensors_header(path))
        else:
            for name, tensor in _load_bin(path).items():
                shapes[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    return shapes


def _load_bin(path: Path) -> dict:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def load_state_dict(checkpoint_dir: Path) -> dict:
    """All tensors of the checkpoint, on CPU, in their stored dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict = {}
    for path in weight_files(checkpoint_dir):
        if path.suffix == ".safetensors":
            safetensors_header(path)  # clear error for truncated files before safetensors' own
            try:
                state.update(load_file(str(path), device="cpu"))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot load {path}: {exc}") from None
        else:
            state.update(_load_bin(path))
    return state


def compare_keys(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], optional: set[str] = frozenset()
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(
        f"{k} {list(found[k])} (expected {list(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))
