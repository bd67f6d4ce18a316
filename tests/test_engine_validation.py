"""Engine dirs validated in one place: the manifest schema, paths kept inside the dir, a checksum
record for every artifact file, large files hashed (once per file version), and `ppllava check`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ppllava.runtime.manifest as manifest_module
from ppllava.runtime import EngineError, Pipeline
from ppllava.runtime.manifest import Manifest

FRAMES = np.random.default_rng(0).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("vicuna")


def _edited(engine, tmp_path, edit):
    work = tmp_path / "e"
    shutil.copytree(engine, work, symlinks=True)
    data = json.loads((work / "manifest.json").read_text())
    edit(data, work)
    (work / "manifest.json").write_text(json.dumps(data))
    return work


def _at(path, change):
    """An edit that applies ``change(parent, key)`` at the dotted ``path`` of the manifest."""
    def edit(data, _):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        change(node, last)
    return edit


def _set(path):
    return _at(path, lambda node, key: node.__setitem__(key, None))


def _delete(path):
    return _at(path, lambda node, key: node.__delitem__(key))


@pytest.mark.parametrize("edit, message", [
    (_set("dims"), "dims must be an object"),
    (_set("dims.max_frames"), "dims.max_frames must be an integer >= 1"),
    (_set("preprocessing.mean"), "preprocessing.mean must be a list of 3"),
    (_set("pooling.temperature"), "pooling.temperature must be a positive number"),
    (_set("llm.eos_token_ids"), "llm.eos_token_ids must be a list of token ids"),
    (_delete("llm.template.user"), "lacks llm.template.user"),
    (_set("stages"), "stages must be an object"),
    (_delete("source"), "lacks source"),
    (lambda d, _: d["stages"]["pool"].update(files={}), "pool artifact has no checksum records"),
    (lambda d, _: d["stages"]["llm"]["files"].pop("llm/model.onnx.data"), "llm/model.onnx.data of the llm artifact has no checksum record"),
    (lambda d, _: d["files"].pop("embeddings.safetensors"), "embeddings.safetensors has no checksum record"),
    (lambda d, _: d["stages"]["pool"].update(file="../../../etc/passwd"), "outside the engine dir"),
    (lambda d, _: d["stages"]["pool"].update(file="/etc/passwd"), "paths are relative to the engine dir"),
])
def test_damaged_manifest_is_one_line(engine, tmp_path, edit, message):
    work = _edited(engine, tmp_path, edit)
    with pytest.raises(EngineError, match=message) as info:
        Pipeline.open(work)
    assert "\n" not in str(info.value)
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "check", str(work)], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and message.split()[0] in r.stderr


def test_symlink_leaving_the_engine_dir_is_refused(engine, tmp_path):
    def edit(_, work):
        outside = tmp_path / "outside.onnx"
        shutil.copy(work / "pool.onnx", outside)
        (work / "pool.onnx").unlink()
        (work / "pool.onnx").symlink_to(outside)

    with pytest.raises(EngineError, match="outside the engine dir"):
        Pipeline.open(_edited(engine, tmp_path, edit))


def test_same_size_corruption_of_a_large_file_is_caught(engine, tmp_path, monkeypatch):
    """Files over CHECKSUM_BYTES are hashed once per file version; a corrupted copy is a new version."""
    monkeypatch.setattr(manifest_module, "CHECKSUM_BYTES", 1024)  # the tiny engine's weights count as large
    monkeypatch.setenv("PPLLAVA_CACHE_DIR", str(tmp_path / "state"))
    work = tmp_path / "copy"
    shutil.copytree(engine, work)
    first = Manifest.load(work, check_files=False).check_files()
    assert first["hashed"] == first["bytes"]  # the first open checks everything
    again = Manifest.load(work, check_files=False).check_files()
    small = sum(f.stat().st_size for f in work.rglob("*") if f.is_file() and f.stat().st_size <= 1024
                and f.name != "manifest.json" and f.name != "verify.json")
    assert again["hashed"] <= small < first["bytes"] // 10  # large files are not hashed again
    weights = work / "llm" / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16384] = bytes(16384)  # 16 KB overwritten, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="does not match the checksum"):
        Pipeline.open(work)


def test_check_command_verifies_every_file(engine, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "check", str(engine)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    files = len(Manifest.load(engine)._groups()["shared"])
    assert f"{engine}: ok" in r.stdout and int(r.stdout.split("ok, ")[1].split()[0]) > files
    work = tmp_path / "bad"
    shutil.copytree(engine, work)
    data = bytearray((work / "llm" / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (work / "llm" / "model.onnx.data").write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "check", str(work), "--quiet"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode != 0 and "does not match the checksum" in r.stderr and "Traceback" not in r.stderr
    # torch-free: the command runs with torch made unimportable
    code = "import sys; sys.modules['torch'] = None; from ppllava.cli import main; sys.exit(main(['check', sys.argv[1]]))"
    r = subprocess.run([sys.executable, "-c", code, str(engine)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_cache_persists_between_processes(engine, tmp_path):
    """A second `ppllava ask` on the same video in a new process takes the features from disk."""
    import cv2

    video = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(20):
        writer.write(np.full((48, 64, 3), i * 10 % 255, np.uint8))
    writer.release()
    env = {**os.environ, "PPLLAVA_CACHE_DIR": str(tmp_path / "state")}
    ask = [sys.executable, "-m", "ppllava.cli", "ask", str(engine), str(video), "What?", "--json", "--max-new-tokens", "3"]
    runs = [json.loads(subprocess.run(ask, capture_output=True, text=True, env=env, check=True).stdout) for _ in range(2)]
    assert not runs[0]["vision_cached"] and runs[1]["vision_cached"]
    assert "vision" not in runs[1]["timings_ms"] and "hash" not in runs[1]["timings_ms"]  # digest memoised too
    assert runs[0]["token_ids"] == runs[1]["token_ids"]
    assert list((tmp_path / "state" / "features").glob("*.npz"))
    off = json.loads(subprocess.run(ask + ["--no-cache"], capture_output=True, text=True, env=env, check=True).stdout)
    assert not off["vision_cached"] and off["token_ids"] == runs[0]["token_ids"]
