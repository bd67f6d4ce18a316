"""Scratch of interrupted runs: kept beside its destination, named for its owner, removed by the
next run when the owner is dead (one line with the size freed), left alone while the owner runs;
free space checked before any work; nothing written to the system temp dir.

Guards against killed exports and quantizations that silently leave gigabytes behind, and against
a clean-up that deletes the scratch of a run still in progress."""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import ppllava.runtime.scratch as scratch
from ppllava.errors import PPLLaVAError
from ppllava.export.engine import ExportOptions, export_engine
from ppllava.runtime.manifest import MANIFEST
from ppllava.runtime.scratch import DiskSpaceError, sweep, tree_bytes

needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="pip install 'ppllava[quant]' (nvidia-modelopt)")
# What libraries put in the temp dir by themselves, tiny and not ours: onnxruntime's telemetry
# session file and torch's inductor dir (its precompiled-header cache is placed there whatever
# TORCHINDUCTOR_CACHE_DIR says).
LIBRARY_MARKERS = (".ses", "torchinductor_")


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped): what a killed run leaves behind."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    yield child.pid
    child.kill()
    child.wait()


def plant(dest: Path, kind: str, pid: int, nbytes: int, host: str | None = None) -> Path:
    """Scratch as a run of ``pid`` names it, holding ``nbytes`` in two files."""
    path = dest.parent / f".{dest.name}.{kind}-{host or scratch._host()}-{pid}-{os.urandom(3).hex()}"
    (path / "sub").mkdir(parents=True)
    (path / "vision.onnx").write_bytes(b"\0" * (nbytes - nbytes // 3))
    (path / "sub" / "model.onnx.data").write_bytes(b"\0" * (nbytes // 3))
    return path


class TempWatch:
    """Points the system temp dir (tempfile and $TMPDIR) at an empty folder and records every path
    tempfile creates, so dirs that are removed again before the end are caught too."""

    def __init__(self, monkeypatch, root: Path):
        self.dir = root / "system-tmp"
        self.dir.mkdir()
        self.made: list[str] = []
        monkeypatch.setenv("TMPDIR", str(self.dir))
        monkeypatch.setattr(tempfile, "tempdir", str(self.dir))
        for name in ("mkdtemp", "mkstemp"):
            monkeypatch.setattr(tempfile, name, self._recording(getattr(tempfile, name)))

    def _recording(self, make):
        def wrapper(*args, **kwargs):
            result = make(*args, **kwargs)
            self.made.append(result if isinstance(result, str) else result[1])
            return result

        return wrapper

    def in_system_temp(self) -> list[str]:
        return [p for p in self.made if Path(p).resolve().is_relative_to(self.dir.resolve())]

    def leftovers(self) -> list[str]:
        return [p.name for p in self.dir.iterdir() if not p.name.startswith(LIBRARY_MARKERS)]


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory, live_pid):
    """One export of the tiny vicuna engine (CLIP tokenizer built too) after a killed one: a dead
    owner's partial dir and a running export's partial dir beside --out, the temp dir watched."""
    root = tmp_path_factory.mktemp("scratch")
    out = root / "engine"
    stale = plant(out, "partial", dead_pid(), 2_100_000)
    live = plant(out, "partial", live_pid, 5_000)
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        watch = TempWatch(mp, root)
        export_engine(ExportOptions(tiny_dirs["vicuna"], out), report=lines.append)
    yield {"out": out, "stale": stale, "live": live, "lines": lines, "watch": watch, "root": root}
    shutil.rmtree(live, ignore_errors=True)


def test_export_removes_a_killed_exports_scratch_and_says_so(exported):
    stale_pid = int(exported["stale"].name.split("-")[-2])
    assert not exported["stale"].exists()
    assert f"removed 2.1 MB of scratch left by an interrupted export (pid {stale_pid})" in exported["lines"]
    assert (exported["out"] / MANIFEST).is_file()


def test_export_leaves_a_running_exports_scratch_alone(exported, live_pid):
    assert (exported["live"] / "vision.onnx").is_file()
    said = [line for line in exported["lines"] if str(exported["live"]) in line]
    assert len(said) == 1 and f"pid {live_pid}" in said[0] and "still running" in said[0], exported["lines"]
    # and nothing of this run is left beside the engine dir
    assert sorted(p.name for p in exported["root"].iterdir() if p.name.startswith(".engine.")) == [exported["live"].name]


def test_export_writes_nothing_to_the_system_temp_dir(exported):
    watch = exported["watch"]
    assert watch.in_system_temp() == [], "export created temp files/dirs in the system temp dir"
    assert watch.leftovers() == [] and tree_bytes(watch.dir) < 2**20, list(watch.dir.iterdir())


def test_export_estimate_covers_what_it_wrote(exported, tiny_dirs):
    from ppllava.export.engine import space_needed

    need = space_needed(ExportOptions(tiny_dirs["vicuna"], exported["root"] / "other"))
    assert need >= tree_bytes(exported["out"])


def test_sweep_judges_each_owner(tmp_path, live_pid):
    dest = tmp_path / "engine"
    dest.mkdir()
    pid = dead_pid()
    dead = [plant(dest, "quant", pid, 1_000_000), plant(dest, "trtllm", pid, 200_000)]
    live = plant(dest, "llmq", live_pid, 1_000)
    elsewhere = plant(dest, "partial", pid, 1_000, host="another-host.example")
    legacy = tmp_path / ".engine.quant-ab3de_gh"  # tempfile's name, from before owners were recorded
    legacy.mkdir()
    (legacy / "x").write_bytes(b"\0" * 3_000)
    other_dest = plant(tmp_path / "engine2", "partial", pid, 1_000)
    lines: list[str] = []
    freed = sweep(dest, lines.append)
    assert freed == 1_200_000 and not any(p.exists() for p in dead)
    assert (f"removed 1.2 MB of scratch left by interrupted runs: quantize --stages (pid {pid}), "
            f"trtllm-build (pid {pid})") in lines
    assert live.exists() and elsewhere.exists() and legacy.exists() and other_dest.exists()
    assert any(str(live) in line and "still running" in line for line in lines)
    assert any(str(elsewhere) in line and "another-host.example" in line for line in lines)
    assert any(str(legacy) in line and "3.0 kB" in line for line in lines)
    assert not any(str(other_dest) in line for line in lines) and len(lines) == 4, lines


def test_sweep_restores_an_out_that_a_killed_swap_moved_aside(tmp_path):
    dest = tmp_path / "engine"
    old = plant(dest, "old", dead_pid(), 1_000)
    (old / MANIFEST).write_text("{}")
    lines: list[str] = []
    sweep(dest, lines.append)
    assert (dest / MANIFEST).is_file() and not old.exists()
    assert len(lines) == 1 and lines[0].startswith(f"restored {dest}")


class _Usage:
    """shutil.disk_usage as a nearly full disk reports it: 10 kB free."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, path):
        self.asked.append(str(path))
        return collections.namedtuple("usage", "total used free")(10**12, 10**12 - 10**4, 10**4)


def test_export_without_space_refuses_before_any_work(tiny_dirs, tmp_path, monkeypatch, capsys):
    import ppllava.export.engine as engine
    from ppllava.cli import main

    usage = _Usage()
    monkeypatch.setattr(shutil, "disk_usage", usage)

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the free-space check")

    monkeypatch.setattr(engine.PPLLaVA, "from_pretrained", no_work)
    parent = tmp_path / "disk"
    parent.mkdir()
    with pytest.raises(DiskSpaceError, match=r"needs about .* but .* has only 10.0 kB free") as info:
        export_engine(ExportOptions(tiny_dirs["qwen"], parent / "engine"), report=lambda _: None)
    assert isinstance(info.value, PPLLaVAError) and "\n" not in str(info.value)
    assert usage.asked == [str(parent)] and list(parent.iterdir()) == []
    # the CLI: one line, exit code 2
    assert main(["export", str(tiny_dirs["qwen"]), "--out", str(parent / "engine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10.0 kB free" in err[0], err
    assert list(parent.iterdir()) == []


def _copy_engine(exported, name: str) -> Path:
    work = exported["root"] / name
    shutil.copytree(exported["out"], work)
    return work


def test_quantize_sweeps_then_refuses_without_space(exported, tmp_path, monkeypatch):
    from ppllava.calibration.llm_quant import quantize_ort_llm
    from ppllava.calibration.quantize import quantize_stages

    work = _copy_engine(exported, "engine_q")
    before = sorted(p.name for p in work.rglob("*"))
    stale = plant(work, "quant", dead_pid(), 3_000_000)
    monkeypatch.setattr(shutil, "disk_usage", _Usage())
    lines: list[str] = []
    with pytest.raises(DiskSpaceError, match="quantizing vision, pool .* 10.0 kB free"):
        quantize_stages(work, tmp_path / "no-calibration-needed-yet", ["vision", "pool"], "int8", progress=lines.append)
    pid = int(stale.name.split("-")[-2])
    assert not stale.exists() and lines == [f"removed 3.0 MB of scratch left by an interrupted quantize --stages (pid {pid})"]
    stale = plant(work, "llmq", dead_pid(), 400_000)
    lines.clear()
    with pytest.raises(DiskSpaceError, match="int4 ONNX LLM .* 10.0 kB free"):
        quantize_ort_llm(work, tmp_path / "no-calibration-needed-yet", "int4", progress=lines.append)
    assert not stale.exists() and len(lines) == 1 and lines[0].startswith("removed 400.0 kB of scratch")
    assert sorted(p.name for p in work.rglob("*")) == before
    assert [p.name for p in exported["root"].iterdir() if p.name.startswith(".engine_q.")] == []


def _calibration_set(engine: Path, root: Path) -> Path:
    from ppllava.calibration.dataset import build_calibration_set, list_videos

    videos = root / "videos"
    videos.mkdir()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        writer = cv2.VideoWriter(str(videos / f"clip{seed}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (80, 64))
        base = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
        for i in range(20):
            writer.write(np.roll(base, 3 * i, axis=1))
        writer.release()
    build_calibration_set(engine, list_videos(videos), root / "calib", progress=lambda _: None)
    return root / "calib"


@needs_modelopt
def test_quantize_keeps_library_temp_files_beside_the_engine(exported, tmp_path, monkeypatch):
    from ppllava.calibration.quantize import quantize_stages

    work = _copy_engine(exported, "engine_t")
    calib = _calibration_set(work, tmp_path)
    watch = TempWatch(monkeypatch, tmp_path)
    quantize_stages(work, calib, ["pool"], "int8", progress=lambda _: None, enforce_thresholds=False)
    assert watch.made, "ModelOpt made no temp files at all: this test no longer watches anything"
    assert watch.in_system_temp() == [], "ModelOpt/onnxruntime model copies went to the system temp dir"
    assert watch.leftovers() == []
    assert [p.name for p in exported["root"].iterdir() if p.name.startswith(".engine_t.")] == []
