"""Per-video vision-feature cache: a follow-up question about the same video skips decoding and
the vision stage. Keyed by file content + sampling parameters + engine identity; bounded in memory,
optionally persisted in a directory that several processes may share.

The disk is treated as untrusted: a file may be truncated by a crash, written by another engine or
another version, or vanish while it is read (another process evicted it). Anything that does not
read back as the features the caller expects is discarded with one warning and counts as a miss;
any failure to write is a warning, never an error, since the answer does not depend on the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ppllava.paths import cache_root

log = logging.getLogger(__name__)

FORMAT = 1  # of the .npz entries; another value is discarded on read
# What np.load and NpzFile raise on a damaged file (pickled content is refused: a ValueError).
UNREADABLE = (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)
STALE_TEMP_S = 3600  # a temporary file this old was left by a killed writer


def default_cache_dir() -> Path:
    """Where the CLI keeps vision features between runs."""
    return cache_root() / "features"


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, then rename it over ``path``: a
    reader in another process sees the old file or the new one, never half of one. No fsync: a
    file damaged by a power loss is discarded on read. The temporary file never outlives a failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------- digests
def _hash(path: Path, chunk: int) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _identity(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


class DigestMemo:
    """Content digests remembered by file identity (device, inode, size, mtime): hashing a 2 GB
    video takes ~4 s, and a follow-up question, in this process or the next, should not pay it
    again. Never a partial hash: a changed file (size or mtime) is hashed whole again.

    With a directory the memo persists in ``<directory>/digests.json``. Writers merge what is on
    disk with their own entries and replace the file atomically; two writers racing may drop one
    entry, which costs one re-hash, never a wrong digest. A damaged index is ignored and rebuilt."""

    NAME = "digests.json"
    LIMIT = 4096  # entries kept; the oldest go first

    def __init__(self, directory: Path | None = None):
        self.path = Path(directory) / self.NAME if directory else None
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()
        self._warned = False

    def lookup(self, path: Path) -> str | None:
        """The remembered digest of ``path`` as it is now, or None (never hashed, or changed)."""
        identity = _identity(os.stat(path))
        with self._lock:
            if identity not in self._known:
                self._known.update(self._read())  # another process may have hashed it meanwhile
            return self._known.get(identity)

    def digest(self, path: Path, chunk: int = 1 << 22) -> str:
        before = os.stat(path)
        if (known := self.lookup(path)) is not None:
            return known
        digest = _hash(path, chunk)
        if _identity(os.stat(path)) == _identity(before):  # not remembered if it changed while hashed
            self._remember(_identity(before), digest)
        return digest

    def _read(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, str) and len(v) == 40 for v in data.values()):
                raise ValueError("not a mapping of file identities to digests")
            return data
        except (FileNotFoundError, NotADirectoryError):
            return {}  # not written yet, or cannot be (then writing it warns)
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not self._warned:  # it is read again before it is rewritten: one warning, not two
                log.warning("ignoring damaged digest index %s (%s); it will be rebuilt", self.path, error)
                self._warned = True
            return {}

    def _remember(self, identity: str, digest: str) -> None:
        with self._lock:
            self._known[identity] = digest
            self._trim(self._known)
            if self.path is None:
                return
            merged = self._read()
            merged.pop(identity, None)  # re-inserted last: the newest entry is trimmed last
            merged[identity] = digest
            self._trim(merged)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(self.path, lambda f: f.write(json.dumps(merged).encode()))
            except OSError as error:
                log.warning("cannot write digest index %s (%s); digests are remembered in memory only",
                            self.path, error)

    def _trim(self, entries: dict[str, str]) -> None:
        for old in list(entries)[: max(len(entries) - self.LIMIT, 0)]:
            del entries[old]


def file_digest(path: Path, chunk: int = 1 << 22, *, memo: DigestMemo | None = None) -> str:
    """blake2b-160 of the whole file; with ``memo``, remembered while the file is unchanged."""
    return memo.digest(path, chunk) if memo is not None else _hash(path, chunk)


# ------------------------------------------------------------------------------------ features
def _host(features) -> np.ndarray:
    """A numpy copy of features that a backend keeps on its device (torch tensors: duck-typed)."""
    if isinstance(features, np.ndarray):
        return features
    return features.float().cpu().numpy()


@dataclass(frozen=True)
class FeatureSpec:
    """What features read back from disk must look like to be used; a field left at its default
    is not checked. Whatever the spec, they must be finite (T, N, C) floats with T >= 1."""

    frame_shape: tuple[int, int] | None = None  # (N, C): tokens per frame, hidden size
    dtypes: tuple[np.dtype, ...] = ()  # e.g. (np.float16, np.float32)
    max_frames: int | None = None

    def problem(self, features: np.ndarray) -> str | None:
        if self.frame_shape is not None and tuple(features.shape[1:]) != tuple(self.frame_shape):
            return f"features {features.shape}, expected (T, {', '.join(map(str, self.frame_shape))})"
        if self.dtypes and features.dtype not in self.dtypes:
            return f"features are {features.dtype}, expected one of {[np.dtype(d).name for d in self.dtypes]}"
        if self.max_frames is not None and features.shape[0] > self.max_frames:
            return f"features have {features.shape[0]} frames, more than the {self.max_frames} expected"
        return None


class _Entry(NamedTuple):
    features: object  # (T, N, C): numpy, or the backend's device tensor for entries made in this process
    media_type: str
    engine: str


def _text(data, name: str) -> str:
    value = data[name]
    if value.shape != () or value.dtype.kind != "U":
        raise ValueError(f"{name} is {value.dtype}{list(value.shape)}, not a string")
    return str(value)


class FeatureCache:
    """Features by key, least recently used evicted first: up to ``max_bytes`` in memory and, with a
    ``directory``, up to ``disk_bytes`` of .npz files there (recency = mtime, touched on each hit).
    Threads may share one cache; processes may share one directory."""

    def __init__(self, max_bytes: int = 512 * 2**20, directory: Path | None = None, disk_bytes: int = 4 * 2**30):
        self.max_bytes = max_bytes
        self.disk_bytes = disk_bytes
        self.directory = Path(directory) if directory else None
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # guards _entries, _bytes and the counters; disk I/O runs outside it
        self.hits = self.misses = 0

    @staticmethod
    def key(content: str, engine: str, **sampling) -> str:
        parts = [content, engine] + [f"{k}={sampling[k]}" for k in sorted(sampling)]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=20).hexdigest()

    def get(self, key: str, engine: str | None = None, expect: FeatureSpec | None = None) -> tuple[object, str] | None:
        """(features, media_type), or None. ``engine`` (as given to ``put``) rejects an entry another
        engine wrote under a colliding key; ``expect`` is checked on entries read from disk (entries
        in memory are this process's own vision output)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and engine is not None and entry.engine != engine:
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.features, entry.media_type
        entry = self._load(key, engine, expect) if self.directory is not None else None
        with self._lock:
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, entry)
        return entry.features, entry.media_type

    def put(self, key: str, features, media_type: str, engine: str | None = None) -> None:
        """Remember features; a failure to write them to disk is a warning (the memory copy stays)."""
        entry = _Entry(features, media_type, engine or "")
        with self._lock:
            self._remember(key, entry)
        if self.directory is not None:
            self._store(key, entry)

    # ---------------------------------------------------------------- memory
    def _remember(self, key: str, entry: _Entry) -> None:
        if (old := self._entries.pop(key, None)) is not None:
            self._bytes -= old.features.nbytes
        size = entry.features.nbytes
        if size > self.max_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.features.nbytes

    # ---------------------------------------------------------------- disk
    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def _load(self, key: str, engine: str | None, expect: FeatureSpec | None) -> _Entry | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:  # our own handle: np.load leaks its own when the zip is damaged
                data = np.load(f, allow_pickle=False)
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise TypeError("an .npy array, not an .npz archive")
                with data:
                    if int(data["format"]) != FORMAT:
                        raise ValueError(f"format {int(data['format'])}, this version reads {FORMAT}")
                    entry = _Entry(data["features"], _text(data, "media_type"), _text(data, "engine"))
        except FileNotFoundError:
            return None  # never written, or evicted by another process meanwhile
        except UNREADABLE as error:
            self._discard(path, f"unreadable ({type(error).__name__}: {error})")
            return None
        if problem := self._problem(entry, engine, expect):
            self._discard(path, problem)
            return None
        try:
            os.utime(path)  # recency for the disk LRU; mtime, since atime is often not kept (noatime)
        except OSError:
            pass  # read-only or already evicted: the entry is still good
        return entry

    @staticmethod
    def _problem(entry: _Entry, engine: str | None, expect: FeatureSpec | None) -> str | None:
        features = entry.features
        if engine is not None and entry.engine != engine:
            return f"written by engine {entry.engine!r}, expected {engine!r}"
        if features.ndim != 3 or features.shape[0] < 1 or features.dtype.kind != "f":
            return f"features {features.shape} {features.dtype} are not (T, N, C) floats"
        if expect is not None and (problem := expect.problem(features)):
            return problem
        if not np.isfinite(features).all():
            return "features hold NaN or inf"
        return None

    def _discard(self, path: Path, reason: str) -> None:
        log.warning("discarding cache file %s: %s", path, reason)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.debug("cannot delete %s: %s", path, error)  # read-only: it is rejected again next time

    def _store(self, key: str, entry: _Entry) -> None:
        path = self._path(key)
        features = _host(entry.features)
        if features.nbytes > self.disk_bytes:
            log.debug("not writing %s: %d bytes exceed disk_bytes=%d", path, features.nbytes, self.disk_bytes)
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda f: np.savez(f, features=features, media_type=np.array(entry.media_type),
                                                   engine=np.array(entry.engine), format=np.array(FORMAT)))
        except OSError as error:
            log.warning("cannot write cache file %s (%s); the features stay cached in memory only", path, error)
            return
        self._trim_disk(keep=path)

    def _trim_disk(self, keep: Path) -> None:
        """Delete the least recently used .npz files until they fit in ``disk_bytes`` (``keep``, just
        written, goes only if it alone is too large), and temporary files that killed writers left
        behind. Files may vanish meanwhile: other processes trim too."""
        files, now = [], time.time()
        try:
            listing = list(self.directory.iterdir())
        except OSError as error:
            log.warning("cannot list cache directory %s (%s); not trimmed", self.directory, error)
            return
        for path in listing:
            try:
                stat = path.stat()
                if path.suffix == ".tmp" and path.name.startswith(".") and now - stat.st_mtime > STALE_TEMP_S:
                    path.unlink()
                elif path.suffix == ".npz":
                    files.append((stat.st_mtime_ns, path == keep, stat.st_size, path))
            except FileNotFoundError:
                continue
            except OSError as error:
                log.debug("cannot trim %s: %s", path, error)
        total = sum(size for _, _, size, _ in files)
        for _, _, size, path in sorted(files):  # ``keep`` last, even if written in the same clock tick as others
            if total <= self.disk_bytes:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                log.warning("cannot evict cache file %s (%s); the cache directory may exceed %d bytes",
                            path, error, self.disk_bytes)
                return
            total -= size
