"""The feature cache and the digest memo on their own: no engine, no torch. The disk is untrusted
(damaged, foreign, vanishing or unwritable files) and the answer must never depend on it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import resource
import signal
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from ppllava.runtime.cache import DigestMemo, FeatureCache, FeatureSpec, default_cache_dir, file_digest

ROOT = Path(__file__).resolve().parents[1]

ENGINE = "fingerprint:abc:onnxruntime"
SPEC = FeatureSpec(frame_shape=(6, 8), dtypes=(np.float16, np.float32), max_frames=4)


def features(frames: int = 2, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, 6, 8)).astype(dtype)  # (T, N, C)


def key(name: str = "video") -> str:
    return FeatureCache.key(name, ENGINE, frames=2, start=None, end=None)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ppllava.runtime.cache" and r.levelno == logging.WARNING]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".tmp")


def test_round_trip_memory_and_disk(tmp_path):
    # Guards against: a persisted entry that does not come back as it went in (dtype, media type).
    value = features(dtype=np.float16)
    FeatureCache(directory=tmp_path).put(key(), value, "image", engine=ENGINE)
    fresh = FeatureCache(directory=tmp_path)  # a later process: nothing in memory
    got, media = fresh.get(key(), engine=ENGINE, expect=SPEC)
    assert media == "image" and got.dtype == np.float16 and np.array_equal(got, value)
    assert fresh.get(key(), engine=ENGINE) is not None and (fresh.hits, fresh.misses) == (2, 0)
    assert FeatureCache().get(key()) is None  # the default is memory-only


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the features: the zip CRC no longer matches
    path.write_bytes(bytes(data))


def _save(path: Path, save, *args, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: given a name, numpy would append its own suffix
        save(f, *args, **arrays)


DAMAGE = {
    "truncated": _truncated,
    "bit flip": _flipped,
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"not a cache file at all" * 10),
    "pickle": lambda p: p.write_bytes(pickle.dumps({"features": [1, 2]})),
    "npy": lambda p: _save(p, np.save, features()),
    "old format": lambda p: _save(p, np.savez, features=features(), media_type=np.array("video")),
    "media type not text": lambda p: _save(p, np.savez, features=features(), media_type=np.array(3),
                                           engine=np.array(ENGINE), format=np.array(1)),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_unreadable_file_is_one_warning_and_a_miss(tmp_path, caplog, damage):
    # Guards against: a damaged cache file (BadZipFile, EOFError, ...) failing every later question.
    FeatureCache(directory=tmp_path).put(key(), features(), "video", engine=ENGINE)
    path = tmp_path / f"{key()}.npz"
    DAMAGE[damage](path)
    cache = FeatureCache(directory=tmp_path)
    assert cache.get(key(), engine=ENGINE, expect=SPEC) is None and cache.misses == 1
    assert len(warnings_of(caplog)) == 1 and "discarding" in warnings_of(caplog)[0]
    assert not path.exists()  # deleted: the next get is a plain miss, without a second warning
    assert cache.get(key(), engine=ENGINE) is None and len(warnings_of(caplog)) == 1


BAD_CONTENT = {
    "nan": (lambda: np.where(np.arange(96).reshape(2, 6, 8) == 5, np.nan, features()).astype(np.float32), "NaN"),
    "inf": (lambda: np.full((2, 6, 8), np.inf, np.float16), "NaN or inf"),
    "frame shape": (lambda: np.zeros((2, 6, 9), np.float32), "expected (T, 6, 8)"),
    "dtype": (lambda: np.zeros((2, 6, 8), np.float64), "float64"),
    "too many frames": (lambda: np.zeros((5, 6, 8), np.float32), "5 frames"),
    "not (T, N, C)": (lambda: np.zeros((6, 8), np.float32), "not (T, N, C)"),
    "integers": (lambda: np.zeros((2, 6, 8), np.int32), "not (T, N, C)"),
}


@pytest.mark.parametrize("bad", BAD_CONTENT, ids=list(BAD_CONTENT))
def test_features_that_do_not_match_are_rejected(tmp_path, caplog, bad):
    # Guards against: a readable file whose features are poisoned or of another shape being used.
    make, reason = BAD_CONTENT[bad]
    FeatureCache(directory=tmp_path).put(key(), make(), "video", engine=ENGINE)
    cache = FeatureCache(directory=tmp_path)
    assert cache.get(key(), engine=ENGINE, expect=SPEC) is None
    assert len(warnings_of(caplog)) == 1 and reason in warnings_of(caplog)[0], warnings_of(caplog)
    assert not (tmp_path / f"{key()}.npz").exists()


def test_entry_of_another_engine_is_rejected(tmp_path, caplog):
    # Guards against: features of another engine (a colliding or copied key) answering for this one.
    FeatureCache(directory=tmp_path).put(key(), features(), "video", engine="other-engine")
    assert FeatureCache(directory=tmp_path).get(key(), engine=ENGINE) is None
    assert "other-engine" in warnings_of(caplog)[0]
    memory = FeatureCache()
    memory.put(key(), features(), "video", engine="other-engine")
    assert memory.get(key(), engine=ENGINE) is None and memory.get(key(), engine="other-engine") is not None


def test_directory_that_is_a_file_is_a_warning(tmp_path, caplog):
    # Guards against: an unwritable cache location turning a good answer into a crash.
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the directory should be")
    for directory in (blocker, blocker / "below"):
        cache = FeatureCache(directory=directory)
        cache.put(key(), features(), "video", engine=ENGINE)
        assert cache.get(key(), engine=ENGINE) is not None  # the memory copy still answers
    assert len(warnings_of(caplog)) == 2 and all("cannot write" in w for w in warnings_of(caplog))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_a_warning(tmp_path, caplog):
    tmp_path.chmod(0o500)
    try:
        cache = FeatureCache(directory=tmp_path)
        cache.put(key(), features(), "video", engine=ENGINE)
        assert cache.get(key(), engine=ENGINE) is not None and len(warnings_of(caplog)) == 1
    finally:
        tmp_path.chmod(0o700)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_full_disk_is_a_warning_and_leaves_no_temporary_file(tmp_path, caplog):
    # Guards against: a write that fails half-way (disk full) raising, or leaving its temporary file.
    # RLIMIT_FSIZE makes a write past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC.
    big = np.random.default_rng(0).standard_normal((4, 64, 256)).astype(np.float32)  # 256 KiB
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cache = FeatureCache(directory=tmp_path)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, limits[1]))
        cache.put(key(), big, "video", engine=ENGINE)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert len(warnings_of(caplog)) == 1 and "cannot write" in warnings_of(caplog)[0]
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(cache.get(key(), engine=ENGINE)[0], big)


def test_disk_is_bounded_and_evicts_least_recently_used(tmp_path):
    # Guards against: a persistent cache that grows without bound, or evicts what was just used.
    names = ["a", "b", "c"]
    writer = FeatureCache(max_bytes=0, directory=tmp_path)  # memory off: every get reads the disk
    for i, name in enumerate(names):
        writer.put(key(name), features(seed=i), "video", engine=ENGINE)
        os.utime(tmp_path / f"{key(name)}.npz", ns=(10**18 + i, 10**18 + i))  # a before b before c
    size = (tmp_path / f"{key('a')}.npz").stat().st_size
    reader = FeatureCache(max_bytes=0, directory=tmp_path, disk_bytes=3 * size)
    assert reader.get(key("a"), engine=ENGINE) is not None  # a hit makes a the most recently used
    reader.put(key("d"), features(seed=3), "video", engine=ENGINE)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == sorted(f"{key(n)}.npz" for n in ("a", "c", "d"))
    stale = tmp_path / f".{key('f')}.killed.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    reader.put(key("f"), features(seed=5), "video", engine=ENGINE)
    assert leftovers(tmp_path) == [] and len(list(tmp_path.glob("*.npz"))) == 3
    small = FeatureCache(directory=tmp_path / "small", disk_bytes=size - 1)
    small.put(key("e"), features(seed=4), "video", engine=ENGINE)
    assert list(small.directory.iterdir()) == [] and small.get(key("e")) is not None  # too large for the disk alone


class SlowFeatures:
    """Features whose size takes a moment to read, as a device tensor's might: threads switch there."""

    shape = (2, 6, 8)

    @property
    def nbytes(self) -> int:
        time.sleep(1e-4)
        return 384


def run_threads(work, count: int) -> list[BaseException]:
    errors, barrier = [], threading.Barrier(count)

    def run(worker: int) -> None:
        barrier.wait()
        try:
            work(worker)
        except Exception as error:  # noqa: BLE001 -- any failure in a thread is reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_share_one_cache():
    # Guards against: a Pipeline's threads corrupting the LRU (KeyError on popitem, lost counts).
    cache, rounds = FeatureCache(max_bytes=3 * 384), 200

    def work(worker: int) -> None:
        for i in range(rounds):
            k = key(str((7 * i + worker) % 6))  # 6 keys, room for 3: evictions all the time
            if cache.get(k) is None:
                cache.put(k, SlowFeatures(), "video")

    assert run_threads(work, 4) == []
    assert cache.hits + cache.misses == 4 * rounds
    assert cache._bytes == 384 * len(cache._entries) <= cache.max_bytes


def test_writers_sharing_a_directory(tmp_path, caplog):
    # Guards against: processes sharing a directory reading half-written files or failing on files
    # another one evicted; each thread has its own cache, as each process would.
    values = {k: features(seed=k) for k in range(6)}
    FeatureCache(directory=tmp_path / "one").put(key(), values[0], "video", engine=ENGINE)
    size = (tmp_path / "one" / f"{key()}.npz").stat().st_size  # the budget holds 3 of the 6 keys

    def work(worker: int) -> None:
        cache = FeatureCache(max_bytes=0, directory=tmp_path, disk_bytes=3 * size)
        for i in range(40):
            k = (5 * i + worker) % 6
            got = cache.get(key(str(k)), engine=ENGINE, expect=SPEC)
            if got is None:
                cache.put(key(str(k)), values[k], "video", engine=ENGINE)
            else:
                assert np.array_equal(got[0], values[k])

    assert run_threads(work, 4) == []
    assert warnings_of(caplog) == [] and leftovers(tmp_path) == []
    assert sum(p.stat().st_size for p in tmp_path.glob("*.npz")) <= 3 * size


def test_processes_sharing_a_directory_tolerate_vanishing_files(tmp_path, caplog):
    # Guards against: a file evicted by another process between listing and reading failing a get.
    ours, theirs = FeatureCache(max_bytes=0, directory=tmp_path), FeatureCache(max_bytes=0, directory=tmp_path)
    ours.put(key(), features(), "video", engine=ENGINE)
    (tmp_path / f"{key()}.npz").unlink()  # what theirs' eviction does
    assert theirs.get(key(), engine=ENGINE) is None and warnings_of(caplog) == []
    theirs.put(key(), features(seed=1), "video", engine=ENGINE)  # replaces atomically over ours' file
    ours.put(key(), features(seed=2), "video", engine=ENGINE)
    assert np.array_equal(theirs.get(key(), engine=ENGINE)[0], features(seed=2)) and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------- digests
def rewrite_keeping_identity(path: Path, data: bytes) -> None:
    """Change a file's bytes but not its size, mtime or inode: only a memo would not notice."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_digest_is_memoised_across_processes(tmp_path):
    # Guards against: a large video re-hashed (~4 s for 2 GB) for every question and every run.
    video = tmp_path / "video.mp4"
    video.write_bytes(b"A" * 1000)
    memo_dir = tmp_path / "cache"
    first = file_digest(video, memo=DigestMemo(memo_dir))
    assert first == file_digest(video)
    rewrite_keeping_identity(video, b"B" * 1000)
    assert file_digest(video, memo=DigestMemo(memo_dir)) == first  # a new memo (process) reads the index
    assert file_digest(video) != first  # ...which is how we know it did not hash again
    assert json.loads((memo_dir / DigestMemo.NAME).read_text())  # the index is plain JSON


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_changed_file_is_hashed_again(tmp_path, change):
    # Guards against: a stale digest (and so stale features) after the video was replaced.
    video = tmp_path / "video.mp4"
    video.write_bytes(b"A" * 1000)
    memo = DigestMemo(tmp_path / "cache")
    first = memo.digest(video)
    if change == "mtime":
        rewrite_keeping_identity(video, b"B" * 1000)
        stat = video.stat()
        os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    else:
        video.write_bytes(b"A" * 1001)
    assert memo.lookup(video) is None
    assert memo.digest(video) == file_digest(video) != first


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"1:2:3:4": 5}'])
def test_damaged_index_is_ignored_and_rebuilt(tmp_path, caplog, damage):
    # Guards against: a torn or foreign digests.json failing every question, or a digest read from it.
    video = tmp_path / "video.mp4"
    video.write_bytes(b"A" * 1000)
    memo_dir = tmp_path / "cache"
    memo_dir.mkdir()
    (memo_dir / DigestMemo.NAME).write_bytes(damage)
    assert DigestMemo(memo_dir).digest(video) == file_digest(video)
    assert len(warnings_of(caplog)) == 1 and "digest index" in warnings_of(caplog)[0]
    assert DigestMemo(memo_dir).lookup(video) == file_digest(video)  # rebuilt


def test_concurrent_index_writers(tmp_path):
    # Guards against: writers in several processes tearing the index (each sees its own memo object).
    videos = []
    for i in range(12):
        videos.append(tmp_path / f"{i}.mp4")
        videos[-1].write_bytes(bytes([i]) * 100)
    memo_dir = tmp_path / "cache"
    results: dict[Path, str] = {}
    threads = [threading.Thread(target=lambda v=v: results.__setitem__(v, DigestMemo(memo_dir).digest(v)))
               for v in videos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[v] == file_digest(v) for v in videos)
    index = json.loads((memo_dir / DigestMemo.NAME).read_text())
    assert index and set(index.values()) <= set(results.values()) and leftovers(memo_dir) == []


def test_unwritable_index_still_gives_the_digest(tmp_path, caplog):
    video = tmp_path / "video.mp4"
    video.write_bytes(b"A" * 1000)
    (tmp_path / "cache").write_text("a file where the directory should be")
    memo = DigestMemo(tmp_path / "cache")
    assert memo.digest(video) == file_digest(video) == memo.lookup(video)  # remembered in memory
    assert len(warnings_of(caplog)) == 1 and "cannot write digest index" in warnings_of(caplog)[0]


def test_default_cache_dir(monkeypatch, tmp_path):
    # Guards against: the persistent CLI cache landing outside the user's cache directory.
    monkeypatch.delenv("PPLLAVA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ppllava" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ppllava" / "features"
    monkeypatch.setenv("PPLLAVA_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "features"


def test_every_per_user_cache_follows_the_documented_variable(monkeypatch, tmp_path):
    # Guards against: the bench's random-weight engines, the converted SmolLM2 and the llama.cpp
    # comparison's conversions read an undocumented $PPLLAVA_CACHE of their own (gigabytes left in
    # ~/.cache when a user points $PPLLAVA_CACHE_DIR elsewhere), and the demo a fixed ~/.cache path.
    import importlib.util

    from ppllava import cli, smollm
    from ppllava.export import bench_support

    monkeypatch.setenv("PPLLAVA_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("PPLLAVA_CACHE", str(tmp_path / "other"))
    mine = tmp_path / "mine"
    assert bench_support.cache_root() == mine / "bench"
    assert smollm.cache_dir().parent == mine
    spec = importlib.util.spec_from_file_location("llamacpp_decode", ROOT / "benchmarks" / "llamacpp_decode.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "llamacpp_decode", script)  # its dataclasses look their module up
    spec.loader.exec_module(script)
    engine = tmp_path / "engine"
    manifest = types.SimpleNamespace(data={"created_at": "t", "source": {"fingerprint": "f"}})
    assert script.work_dir(argparse.Namespace(work=None, engine=engine), manifest).parent == mine / "llamacpp-decode"
    assert cli.demo_dir(cli.build_parser().parse_args(["demo"]).dir) == mine / "demo"
