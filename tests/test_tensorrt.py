"""TensorRT / TensorRT-LLM paths: everything that runs without the libraries is tested here; the
builds themselves are GPU tests, skipped cleanly where TensorRT is absent."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.errors import BackendError, BuildError
from ppllava.export.tensorrt import build_plan, max_visual_tokens, trtllm_build_command
from ppllava.runtime.manifest import Manifest, add_variants, variant_record
from ppllava.runtime.pipeline import Pipeline
from ppllava.runtime.backends.tensorrt import check_plan
from ppllava.runtime.backends.tensorrt_llm import embed_with_prompt_table

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def engine(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "engine"
    export_engine(ExportOptions(tiny_dirs["vicuna"], out), report=lambda _: None)
    return out


def test_build_plan_profiles_from_manifest(engine):
    steps = {s.stage: s for s in build_plan(engine, "fp16")}
    assert steps["vision"].profile.shapes["pixel_values"] == ((1, 3, 42, 42), (8, 3, 42, 42), (8, 3, 42, 42))
    assert steps["text"].profile.shapes["clip_ids"] == ((1, 1), (1, 77), (1, 248))
    assert steps["pool"].profile.shapes["window_index"] == ((1, 1), (16, 18), (288, 288))
    assert steps["vision"].flags == ["FP16"] and steps["vision"].plan.name == "vision.fp16.plan"
    small = {s.stage: s for s in build_plan(engine, "fp16", max_frames=4)}
    assert small["vision"].profile.shapes["pixel_values"][2] == (4, 3, 42, 42)


def test_build_plan_refuses_missing_qdq_and_bad_options(engine):
    with pytest.raises(BuildError, match="no int8 Q/DQ ONNX; run `ppllava quantize"):
        build_plan(engine, "int8")
    with pytest.raises(BuildError, match="--precision"):
        build_plan(engine, "int4")
    with pytest.raises(BuildError, match="--max-frames"):
        build_plan(engine, "fp16", max_frames=99)


def test_build_plan_uses_qdq_variants(engine, tmp_path):
    import shutil

    work = tmp_path / "e"
    shutil.copytree(engine, work)
    for stage in ("vision", "text", "pool"):
        shutil.copy(work / f"{stage}.onnx", work / f"{stage}.fp8.onnx")
    add_variants(work, [(stage, variant_record(work, work / f"{stage}.fp8.onnx", "onnxruntime", "fp8"))
                        for stage in ("vision", "text", "pool")])
    steps = build_plan(work, "fp8")
    assert steps[0].onnx.name == "vision.fp8.onnx" and steps[0].flags == ["FP16", "FP8"]
    assert any("Jetson Orin has none" in note for note in steps[0].notes)


def _checkpoint(work, scheme):
    """A TensorRT-LLM checkpoint dir recorded the way ``ppllava quantize --llm`` records one."""
    target = work / "trtllm" / scheme
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"quantization": {"quant_algo": scheme}}))
    add_variants(work, [("llm", variant_record(work, target, "tensorrt-llm", scheme, kind="checkpoint"))])


def test_trtllm_build_command(engine, tmp_path):
    import shutil

    work = tmp_path / "e"
    shutil.copytree(engine, work)
    with pytest.raises(BuildError, match="ppllava quantize --llm int8_sq"):
        trtllm_build_command(work, "int8_sq", tmp_path / "out")
    _checkpoint(work, "int8_sq")
    assert max_visual_tokens(Manifest.load(work)) == 16  # default plan: 8 frames of 6x6 with (2,3,3) windows
    visual = Manifest.load(work).stage("pool")["dynamic"]["K"]["max"]
    assert visual == 288  # but any --tokens budget up to every token (8 x 36) can reach the LLM
    args = trtllm_build_command(work, "int8_sq", tmp_path / "out", max_batch=2)
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert value("--checkpoint_dir").endswith("trtllm/int8_sq") and value("--max_batch_size") == "2"
    assert value("--max_prompt_embedding_table_size") == str(visual * 2)
    assert value("--max_seq_len") == "256" and value("--gemm_plugin") == "auto"
    assert int(value("--max_input_len")) < 256  # room to generate
    jetson = trtllm_build_command(work, "int8_sq", tmp_path / "out", release="jetson-v0.12")
    assert jetson[jetson.index("--gemm_plugin") + 1] == "float16" and "--gpt_attention_plugin" in jetson


def test_prompt_table_gives_the_same_llm_input(engine, tiny_models):
    # The ids from the vocabulary size upward, looked up in the prompt table, must rebuild exactly
    # the embeddings the onnxruntime path splices, the pad id's zero embedding included.
    pipe = Pipeline.open(engine)
    rng = np.random.default_rng(0)
    visual = rng.standard_normal((16, 64)).astype(np.float32)
    input_ids = np.array([[5, 0, 1000, 7, 8, 9]])  # 0 is the tiny Vicuna's pad id
    prompt = pipe.prompt(input_ids, visual)
    ids, table = prompt.prompt_table(1024)
    assert ids.shape == (1, 5 + 16) and ids[0, 2] == 1024 and ids[0, 17] == 1039 and ids[0, 1] == 1024 + 16
    assert table.shape == (17, 64) and not table[16].any()
    np.testing.assert_array_equal(embed_with_prompt_table(ids, table, pipe.embed_tokens), pipe.embed_prompt(input_ids, visual))


def test_stale_plan_is_refused():
    built = {"file": "vision.fp16.plan", "tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    check_plan(built, dict(built))
    for key, other in (("tensorrt", "10.8.0"), ("gpu", "NVIDIA H100"), ("compute_capability", "9.0")):
        with pytest.raises(BackendError, match="rebuild it here with `ppllava build-engines`"):
            check_plan(built, {**built, key: other})


def test_doctor_without_gpu_libraries(engine):
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "doctor", str(engine)], capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    if not HAS_TRT:
        assert "TensorRT           not installed" in r.stdout
    assert "onnxruntime" in r.stdout and "Jetson Orin Nano 8 GB" in r.stdout and "needs about" in r.stdout
    import torch

    assert f"torch backend      torch {torch.__version__}" in r.stdout


def test_build_engines_without_tensorrt_is_one_line(engine):
    if HAS_TRT:
        pytest.skip("TensorRT is installed here")
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "build-engines", str(engine)], capture_output=True, text=True)
    assert r.returncode == 2 and "TensorRT is not installed" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "build-engines", str(engine), "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "vision.fp16.plan" in r.stdout and "trtllm-build" in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (GPU test)")
def test_fp16_engines_match_onnxruntime(engine, tmp_path):
    import shutil

    from ppllava.export.tensorrt import build_engines
    from ppllava.runtime.backends.tensorrt import TrtStage

    work = tmp_path / "e"
    shutil.copytree(engine, work)
    build_engines(work, "fp16", report=lambda _: None)
    manifest = Manifest.load(work)
    plan = manifest.stage_variant("vision", "tensorrt:fp16")
    stage = TrtStage(manifest.path(plan), plan)
    pixels = np.random.default_rng(0).standard_normal((4, 3, 42, 42)).astype(np.float32)
    ort_features = Pipeline.open(work).vision(pixels)
    np.testing.assert_allclose(stage.run(pixel_values=pixels)["features"], ort_features, atol=5e-2)


def test_backend_selection_without_plans_is_one_line(engine, written_clip):
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "ask", str(engine), str(written_clip), "hi",
                        "--backend", "tensorrt"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "ppllava build-engines" in lines[0], r.stderr


@pytest.fixture(scope="module")
def written_clip(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("clip") / "c.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    return path


def test_trtllm_build_is_published_and_recorded(engine, tmp_path, monkeypatch):
    # A stand-in trtllm-build (the real one needs a GPU): checks the engine lands atomically and is recorded.
    import os
    import shutil

    import ppllava.export.tensorrt as trt_export

    work = tmp_path / "e"
    shutil.copytree(engine, work)
    fake = tmp_path / "bin" / "trtllm-build"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--output_dir" ]; do shift; done\nmkdir -p "$2" && echo ok > "$2/rank0.engine"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(trt_export, "gpu_identity", lambda: {"tensorrt": "10.3", "gpu": "test", "compute_capability": "8.7"})
    _checkpoint(work, "int8_wo")
    command = trtllm_build_command(work, "int8_wo", work / "trtllm_engine")
    first = trt_export.run_trtllm_build(work, "int8_wo", command, report=lambda _: None)
    second = trt_export.run_trtllm_build(work, "int8_wo", command, report=lambda _: None)
    recorded = Manifest.load(work).variants("llm", "tensorrt-llm")
    assert list(recorded) == ["int8_wo"] and recorded["int8_wo"]["gpu"] == "test"
    assert recorded["int8_wo"]["files"] == {f"{second.name}/rank0.engine": {
        "bytes": 3, "sha256": hashlib.sha256(b"ok\n").hexdigest()}}  # checked at load like every artifact
    recorded = recorded["int8_wo"]
    assert recorded["dir"] == second.name and (second / "rank0.engine").is_file() and not first.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e.trtllm-")]
    fake.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(BuildError, match="exit code 3"):
        trt_export.run_trtllm_build(work, "int8_wo", command, report=lambda _: None)
    assert Manifest.load(work).variants("llm", "tensorrt-llm")["int8_wo"]["dir"] == second.name
