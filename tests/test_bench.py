"""ppllava bench: statistics, cold/warm/follow-up separation, JSON and plot, and --compare torch on
identical inputs. Guards against numbers that look plausible but mix regimes or inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.runtime import bench
from ppllava.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def engine(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "engine"
    export_engine(ExportOptions(tiny_dirs["vicuna"], out), report=lambda _: None)
    return out


def test_summarize():
    s = bench.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"min": 1.0, "median": 3.0, "p95": pytest.approx(4.8), "mean": 3.0, "n": 5}
    assert bench.summarize([7.0])["p95"] == 7.0
    assert bench.summarize([]) == {}


def test_run_derived_values():
    run = bench.Run({"vision": 10.0, "prefill": 5.0, "decode": 30.0}, 50.0, 4)
    assert run.ttft == 15.0 and run.ms_per_token == 10.0
    assert bench.Run({"decode": 0.0}, 1.0, 1).ms_per_token is None


def test_schedule_separates_cold_warm_and_follow_up(engine):
    pipe = Pipeline.open(engine)
    options = bench.BenchOptions(synthetic_frames=4, questions=3, repeat=3, warmup=1, max_new_tokens=5)
    result = bench.bench_pipeline(pipe, options, log_line=lambda _: None)
    assert result.cold is not None and len(result.first) == 3 and len(result.follow_up) == 6
    assert all("vision" in r.stages and "decode_sample" in r.stages for r in result.first)
    assert all("vision" not in r.stages for r in result.follow_up)  # vision cached
    assert all(r.new_tokens == 5 for r in result.first + result.follow_up)  # end of text ignored
    summary = result.summary()
    first = summary["first_question"]
    assert first["stages_ms"]["vision"]["n"] == 3
    assert first["time_to_first_token_ms"]["median"] < first["end_to_end_ms"]["median"]
    assert summary["follow_up"]["time_to_first_token_ms"]["median"] < first["time_to_first_token_ms"]["median"]
    assert first["tokens_per_s"] == pytest.approx(1000 / first["decode_ms_per_token"]["median"])


def test_same_timing_path_as_ask_json(engine, tmp_path):
    frames_video = tmp_path / "v.mp4"
    import cv2

    writer = cv2.VideoWriter(str(frames_video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(20):
        writer.write(np.full((48, 64, 3), i * 10, np.uint8))
    writer.release()
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "ask", str(engine), str(frames_video), "hi", "--json",
                        "--max-new-tokens", "3"], capture_output=True, text=True)
    ask_stages = set(json.loads(r.stdout)["timings_ms"])
    pipe = Pipeline.open(engine)
    result = bench.bench_pipeline(pipe, bench.BenchOptions(video=frames_video, questions=1, repeat=1, warmup=0,
                                                           max_new_tokens=3), log_line=lambda _: None)
    # the file's content hash is remembered per process, so only the very first question pays it
    assert "hash" in ask_stages and "hash" in result.cold.stages
    assert set(result.first[0].stages) == ask_stages - {"hash"}


def test_cli_compare_torch_json_and_plot(engine, tiny_dirs, tmp_path):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    r = subprocess.run(
        [sys.executable, "-m", "ppllava.cli", "bench", str(engine), "--synthetic-frames", "4", "--repeat", "2",
         "--warmup", "0", "--max-new-tokens", "4", "--compare", "torch", "--checkpoint", str(tiny_dirs["vicuna"]),
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out_json.read_text())
    assert set(data["backends"]) == {"onnxruntime", "torch-eager"}
    assert data["same_inputs_same_tokens"] is True  # identical inputs -> identical greedy tokens
    for name in ("onnxruntime", "torch-eager"):
        block = data["backends"][name]
        assert block["cold"]["end_to_end_ms"] > 0 and block["peak_host_mib"] > 0
        assert set(block["first_question"]["stages_ms"]) == set(bench.PHASES) - {"hash"}
        assert block["first_question"]["stages_ms"]["vision"]["n"] == 2
    assert {"vision", "prefill", "decode", "time_to_first_token", "end_to_end"} <= set(data["ratios"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "time to first token" in r.stdout and "ratio" in r.stdout


def test_bad_bench_options_are_one_line(engine, tmp_path):
    for args, expected in ((["--synthetic-frames", "0"], "must be >= 1"), (["--repeat", "0"], "--repeat"),
                           (["--video", str(tmp_path / "none.mp4")], "does not exist")):
        r = subprocess.run([sys.executable, "-m", "ppllava.cli", "bench", str(engine), *args], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr
