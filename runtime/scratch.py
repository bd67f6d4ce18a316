"""Scratch directories of the long commands (export, quantize, trtllm-build): beside what they
change, named for their owner, swept when the owner is gone.

Scratch lives in a hidden sibling of its destination, never in the system temp dir: the final
rename is then within one filesystem (atomic), and the next run finds what a killed run left. The
name carries the owner's host and PID (``.engine.partial-gpu01-1234-a1b2c3``), so the next run
tells a dead owner's scratch (removed, in one line with the size freed) from a running one's (left
alone, mentioned) — on a shared NFS dir too, where a PID means nothing without its host.

Torch-free, so export and calibration (which may import the runtime) share it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ppllava.errors import PPLLaVAError

# kind -> the run that makes it, for the report lines.
KINDS = {
    "partial": "export",
    "old": "export --force",  # the previous engine dir, moved aside for the instant of the swap
    "quant": "quantize --stages",
    "llmq": "quantize --llm",
    "trtllm": "trtllm-build",
    "sweep": "clean-up of scratch",  # stale scratch claimed by a sweep that was itself interrupted
}
# Names written before owners were recorded: ``.OUT.partial-PID`` / ``.OUT.old-PID`` (no host) and
# tempfile's ``.ENGINE.quant-XXXXXXXX`` (no owner at all). Nobody can tell whether their run is
# alive, so they are reported with their size, never removed.
_LEGACY = r"(?:(?P<pid_kind>partial|old)-\d+|(?P<tmp_kind>quant|llmq|trtllm)-[a-z0-9_]{8})"

class DiskSpaceError(PPLLaVAError):
    """Not enough free space for a step; raised before the step writes anything."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def scratch_path(dest: Path, kind: str) -> Path:
    """``.<dest>.<kind>-<host>-<pid>-<tag>`` beside ``dest``: a fresh name this process owns."""
    if kind not in KINDS:
        raise ValueError(f"unknown scratch kind {kind!r}; one of {', '.join(KINDS)}")
    return dest.parent / f".{dest.name}.{kind}-{_host()}-{os.getpid()}-{os.urandom(3).hex()}"


def new_scratch(dest: Path, kind: str) -> Path:
    """Create a scratch dir beside ``dest`` (whose parent must exist)."""
    path = scratch_path(dest, kind)
    path.mkdir()
    return path


@contextlib.contextmanager
def scratch_dir(dest: Path, kind: str) -> Iterator[Path]:
    """A scratch dir beside ``dest`` for the ``with`` block, removed at its end (whatever is still there)."""
    path = new_scratch(dest, kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temp_files_in(directory: Path) -> Iterator[None]:
    """Route ``tempfile``'s default directory to ``directory`` for the block.

    ModelOpt and onnxruntime's quantizers write whole model copies with ``tempfile.mkstemp()`` /
    ``TemporaryDirectory()`` and take no directory argument; this is the one seam they offer. It is
    process-wide while the block runs, so it wraps only the library call."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def format_bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed; vanishing files skipped)."""
    total = 0
    for root, _, files in os.walk(path, onerror=lambda _: None):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) is not a probe on Windows: never judge a PID dead there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or not a PID we can ask about)
        return True
    return True


@dataclass
class Scratch:
    path: Path
    kind: str
    host: str | None  # None: a legacy name without an owner
    pid: int | None
    bytes: int

    @property
    def what(self) -> str:
        return KINDS.get(self.kind, self.kind)


def find_scratch(dest: Path) -> list[Scratch]:
    """Every scratch dir of ``dest`` (any kind, any owner) beside it."""
    owned = re.compile(rf"\.{re.escape(dest.name)}\.(?P<kind>{'|'.join(KINDS)})-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{6}}")
    legacy = re.compile(rf"\.{re.escape(dest.name)}\.{_LEGACY}")
    found = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:  # no parent yet: nothing to find
        return []
    for entry in entries:
        if not entry.name.startswith(f".{dest.name}.") or entry.is_symlink() or not entry.is_dir():
            continue
        if m := owned.fullmatch(entry.name):
            found.append(Scratch(entry, m["kind"], m["host"], int(m["pid"]), tree_bytes(entry)))
        elif m := legacy.fullmatch(entry.name):
            found.append(Scratch(entry, m["pid_kind"] or m["tmp_kind"], None, None, tree_bytes(entry)))
    return sorted(found, key=lambda s: s.path.name)


def sweep(dest: Path, report: Callable[[str], None]) -> int:
    """Remove the scratch of ``dest`` whose owner died (one line with the size freed), leave a live
    owner's alone (one line each), restore ``dest`` from an ``old`` dir when a swap was cut short,
    and mention legacy scratch without removing it. Returns the bytes freed."""
    host = _host()
    removed: list[Scratch] = []
    for item in find_scratch(dest):
        if item.host is None:
            report(f"found {format_bytes(item.bytes)} of scratch from an older ppllava at {item.path} (it records no "
                   f"owner): delete it by hand if no {item.what} of {dest.name} is running")
        elif item.host != host:
            report(f"left alone {format_bytes(item.bytes)} of scratch at {item.path}: {item.what} (pid {item.pid}) "
                   f"on host {item.host}, which cannot be checked from {host}")
        elif _alive(item.pid):
            report(f"left alone {format_bytes(item.bytes)} of scratch at {item.path}: {item.what} (pid {item.pid}) "
                   "is still running")
        elif item.kind == "old" and not dest.exists():
            # Killed between moving the old engine dir aside and renaming the new one in: put it back.
            try:
                item.path.rename(dest)
            except FileNotFoundError:  # another run restored it first
                continue
            report(f"restored {dest} (an export --force was interrupted while swapping it, pid {item.pid})")
        else:
            claimed = _claim(item, dest, report)
            if claimed is not None:
                removed.append(claimed)
    freed = sum(item.bytes for item in removed)
    if len(removed) == 1:
        item = removed[0]
        report(f"removed {format_bytes(freed)} of scratch left by an interrupted {item.what} (pid {item.pid})")
    elif removed:
        runs = ", ".join(f"{item.what} (pid {item.pid})" for item in removed)
        report(f"removed {format_bytes(freed)} of scratch left by interrupted runs: {runs}")
    return freed


def _claim(item: Scratch, dest: Path, report: Callable[[str], None]) -> Scratch | None:
    """Rename a dead owner's scratch to our own name, then delete it: of two runs sweeping at once,
    one wins the rename; if we are killed while deleting, the next run sweeps our claim."""
    target = scratch_path(dest, "sweep")
    try:
        item.path.rename(target)
    except FileNotFoundError:  # another run claimed it first
        return None
    except OSError as exc:
        report(f"cannot remove {format_bytes(item.bytes)} of scratch at {item.path} left by {item.what} "
               f"(pid {item.pid}): {exc.strerror or exc}")
        return None
    shutil.rmtree(target, ignore_errors=True)
    if target.exists():
        report(f"could not remove all of {target} (permissions?); delete it by hand")
        item.bytes -= tree_bytes(target)
    return item


def require_free(dest: Path, need: int, what: str) -> None:
    """Refuse a step that needs ``need`` bytes beside ``dest`` when its filesystem has less free."""
    where = dest.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise DiskSpaceError(f"{what} needs about {format_bytes(need)} free beside {dest}, but {where} has only "
                             f"{format_bytes(free)} free; free some space or choose a destination on another disk")
