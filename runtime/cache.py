"""Per-video vision-feature cache: a follow-up question about the same video skips decoding and
the vision stage. Keyed by file content + sampling parameters + engine identity; bounded in memory,
optionally persisted on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _host(features) -> np.ndarray:
    """A numpy copy of features that a backend keeps on its device (torch tensors: duck-typed)."""
    if isinstance(features, np.ndarray):
        return features
    return features.float().cpu().numpy()


class FeatureCache:
    def __init__(self, max_bytes: int = 512 * 2**20, directory: Path | None = None):
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory else None
        self.entries: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(content: str, engine: str, **sampling) -> str:
        parts = [content, engine] + [f"{k}={sampling[k]}" for k in sorted(sampling)]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=20).hexdigest()

    def get(self, key: str) -> tuple[np.ndarray, str] | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key]
        if self.directory is not None:
            path = self.directory / f"{key}.npz"
            if path.is_file():
                try:
                    with np.load(path) as data:
                        value = (data["features"], str(data["media_type"]))
                except (OSError, ValueError, KeyError):
                    log.warning("ignoring unreadable cache file %s", path)
                else:
                    self.hits += 1
                    self._remember(key, value)
                    return value
        self.misses += 1
        return None

    def put(self, key: str, features: np.ndarray, media_type: str) -> None:
        self._remember(key, (features, media_type))
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.npz"
            np.savez(tmp, features=_host(features), media_type=np.array(media_type))
            tmp.replace(self.directory / f"{key}.npz")

    def _remember(self, key: str, value: tuple[np.ndarray, str]) -> None:
        if key in self.entries:
            return
        size = value[0].nbytes
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
