"""ppllava bench: statistics, cold/warm/follow-up separation, JSON and plot, and --compare torch on
identical inputs. Guards against numbers that look plausible but mix regimes or inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from ppllava.export.engine import ExportOptions, export_engine
from ppllava.runtime import bench
from ppllava.runtime.manifest import add_variants, variant_record
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
    assert data["baseline"] == data["ratios"]["baseline"] == "torch-eager" and data["ratios"]["this"] == "onnxruntime"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "time to first token" in r.stdout and "ratio" in r.stdout


def test_bad_bench_options_are_one_line(engine, tmp_path):
    for args, expected in ((["--synthetic-frames", "0"], "must be >= 1"), (["--repeat", "0"], "--repeat"),
                           (["--video", str(tmp_path / "none.mp4")], "does not exist")):
        r = subprocess.run([sys.executable, "-m", "ppllava.cli", "bench", str(engine), *args], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr


@pytest.fixture(scope="module")
def engine_int8(engine, tmp_path_factory):
    """The tiny engine plus an onnxruntime:int8 LLM variant: a copy of the FP graph recorded as int8,
    as `ppllava quantize` would record one (without the calibration, which bench does not need)."""
    out = tmp_path_factory.mktemp("bench_int8") / "engine"
    shutil.copytree(engine, out)
    shutil.copytree(out / "llm", out / "llm_int8")
    add_variants(out, [("llm", variant_record(out, out / "llm_int8", "onnxruntime", "int8"))])
    return out


@pytest.fixture(scope="module")
def measured(engine):
    lines = []
    pipe = Pipeline.open(engine)
    options = bench.BenchOptions(synthetic_frames=4, questions=2, repeat=2, warmup=2, max_new_tokens=3)
    return pipe, options, bench.bench_pipeline(pipe, options, log_line=lines.append), lines


def test_report_records_what_was_measured_and_where(measured, engine):
    """Guards against reports that cannot be compared across machines: inputs, versions, settings and
    hardware missing (visual_tokens was always null)."""
    import cv2
    import onnxruntime
    import tokenizers
    import torch

    import ppllava

    pipe, options, result, _ = measured
    data = bench.report(engine, options, [result])
    answer = pipe.ask(bench.synthetic_frames(4), bench.QUESTIONS[0], max_new_tokens=1)
    assert data["visual_tokens"] == answer.visual_tokens > 0 and data["sampled_frames"] == answer.frames == 4
    assert data["prompt_tokens"] == answer.prompt_tokens > answer.visual_tokens
    block = data["backends"]["onnxruntime"]
    assert block["inputs"]["prompt_tokens"][0] == answer.prompt_tokens and len(block["inputs"]["prompt_tokens"]) == 2
    assert block["providers"] == ["cpu"] and block["threads"] is None and block["precision"] is None
    assert block["stage_precisions"] == {"vision": "fp32", "text": "fp32", "pool": "fp32", "llm": "fp32"}
    assert data["engine_fingerprint"] == json.loads((engine / "manifest.json").read_text())["source"]["fingerprint"]
    stamp = datetime.fromisoformat(data["timestamp_utc"])
    assert stamp.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - stamp) < timedelta(hours=1)
    assert data["versions"]["ppllava"] == ppllava.__version__
    for label, module in (("onnxruntime", onnxruntime), ("numpy", np), ("opencv", cv2), ("tokenizers", tokenizers),
                          ("torch", torch)):  # torch: loaded in this process (the export)
        assert data["versions"][label].startswith(module.__version__), (label, data["versions"][label])
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    if names:
        assert data["machine"]["cpu_model"] == names[0]
        assert data["machine"]["cpu_id"] == bench.cpu_features()["cpu_id"]  # the generation a VM's model name may hide
    assert data["machine"]["cpu_model"] and 1 <= data["machine"]["cpu_usable"] <= data["machine"]["cpu_count"]
    assert data["machine"]["gpu"] is None and block["device"] == "cpu"
    # torch is reported only where the process loaded it
    r = subprocess.run([sys.executable, "-c", "import json; from ppllava.runtime import bench; print(json.dumps(bench.versions()))"],
                       capture_output=True, text=True)
    torch_free = json.loads(r.stdout)
    assert "torch" not in torch_free and torch_free["onnxruntime"] == onnxruntime.__version__


def test_progress_counts_warmups_apart_from_repeats(measured):
    """Guards against a counter that calls the cold run and warm-ups "repeats" (1 + 2 + 2 = "5/5")."""
    assert measured[3] == ["onnxruntime: cold run done", "onnxruntime: warm-up 1/2 done (discarded)",
                           "onnxruntime: warm-up 2/2 done (discarded)", "onnxruntime: repeat 1/2 done",
                           "onnxruntime: repeat 2/2 done"]


def test_stage_precisions_name_the_variant_that_ran(engine_int8):
    """Guards against reporting the FP export's precision for a quantized LLM variant (the
    onnxruntime backend's artifact("llm") names the FP record whichever graph its decoder opened)."""
    fp32 = {"vision": "fp32", "text": "fp32", "pool": "fp32", "llm": "fp32"}
    assert bench.stage_precisions(Pipeline.open(engine_int8)) == fp32
    assert bench.stage_precisions(Pipeline.open(engine_int8, precision="int8")) == {**fp32, "llm": "int8"}


def test_peak_host_memory_is_each_backends_own(engine):
    """Guards against a process-wide peak: the second backend's figure included the first's."""
    options = bench.BenchOptions(synthetic_frames=4, questions=1, repeat=1, warmup=0, max_new_tokens=2)
    first_window = bench.HostMemory()
    spike = np.ones(256 * 2**20 // 8)  # the first backend's peak, freed before the second opens
    del spike
    first = bench.bench_pipeline(Pipeline.open(engine), options, log_line=lambda _: None, memory=first_window)
    second_window = bench.HostMemory()
    second = bench.bench_pipeline(Pipeline.open(engine), options, log_line=lambda _: None, memory=second_window)
    a, b = first.summary(), second.summary()
    assert a["peak_host_own_mib"] > 250 and a["peak_host_mib"] >= a["host_baseline_mib"] + 250, a
    assert b["peak_host_own_mib"] < 200 and b["peak_host_mib"] < a["peak_host_mib"] - 200, (a, b)
    assert b["host_baseline_mib"] > 0 and b["peak_host_method"] in (
        "peak RSS in this backend's window (VmHWM reset via /proc/self/clear_refs)",
        "RSS at the end of this backend's run (peak not resettable here: a lower bound)")
    if bench.reset_peak_rss():  # where the kernel resets the peak, the window's figure is a peak, not an RSS
        assert "clear_refs" in b["peak_host_method"]


def _result(name: str, ms: float) -> bench.BackendResult:
    r = bench.BackendResult(name)
    r.first = [bench.Run({"vision": ms, "prefill": ms, "decode": 3 * ms}, 6 * ms, 4)]
    return r


def test_ratio_is_baseline_over_the_other_for_every_compare():
    """Guards against a ratio whose direction depends on the flag (torch/onnxruntime for --compare
    torch, int4/fp32 for --compare int4): always baseline / other, > 1 when the other is faster."""
    options = bench.BenchOptions(synthetic_frames=4)
    # --compare torch: the runtime runs first, the torch reference is the baseline
    data = bench.report(Path("e"), options, [_result("onnxruntime", 10.0), _result("torch-eager", 40.0)],
                        baseline="torch-eager")
    assert data["baseline"] == data["ratios"]["baseline"] == "torch-eager" and data["ratios"]["this"] == "onnxruntime"
    assert data["ratios"]["vision"] == data["ratios"]["end_to_end"] == data["ratios"]["decode_ms_per_token"] == 4.0
    assert data["ratios"]["meaning"] == "torch-eager median / onnxruntime median (> 1: onnxruntime is faster)"
    # --compare int4: the unquantized run comes first and is the baseline; a faster int4 also reads > 1
    data = bench.report(Path("e"), options, [_result("onnxruntime", 40.0), _result("onnxruntime-int4", 10.0)],
                        baseline="onnxruntime")
    assert data["ratios"]["vision"] == data["ratios"]["time_to_first_token"] == 4.0
    assert data["ratios"]["this"] == "onnxruntime-int4"
    table = bench.format_table(data)
    assert "ratio onnxruntime/onnxruntime-int4" in table and "4.00x" in table
    assert "ratio = onnxruntime median / onnxruntime-int4 median (> 1: onnxruntime-int4 is faster)" in table


def test_cli_compare_refuses_a_missing_variant_before_measuring(engine, tmp_path):
    """Guards against a --compare run the engine cannot do being found out only after the default
    run's minutes of measuring (or with a traceback): one line naming the fix, nothing measured or written."""
    out_json = tmp_path / "never.json"
    r = subprocess.run(
        [sys.executable, "-m", "ppllava.cli", "bench", str(engine), "--synthetic-frames", "4", "--repeat", "1",
         "--warmup", "0", "--max-new-tokens", "3", "--compare", "int8", "--json", str(out_json)],
        capture_output=True, text=True,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "int8" in r.stderr and "ppllava quantize" in r.stderr, r.stderr
    assert "repeat" not in r.stderr and "cold run" not in r.stderr and not out_json.exists()


def test_cli_compare_quantized_names_its_baseline(engine_int8, tmp_path):
    out_json = tmp_path / "q.json"
    r = subprocess.run(
        [sys.executable, "-m", "ppllava.cli", "bench", str(engine_int8), "--synthetic-frames", "4", "--repeat", "2",
         "--warmup", "1", "--max-new-tokens", "3", "--compare", "int8", "--json", str(out_json)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out_json.read_text())
    base, quantized = data["backends"]["onnxruntime"], data["backends"]["onnxruntime-int8"]
    assert data["baseline"] == data["ratios"]["baseline"] == "onnxruntime" and data["ratios"]["this"] == "onnxruntime-int8"
    expected = base["first_question"]["end_to_end_ms"]["median"] / quantized["first_question"]["end_to_end_ms"]["median"]
    assert data["ratios"]["end_to_end"] == pytest.approx(expected, abs=1e-3)
    assert base["stage_precisions"]["llm"] == "fp32" and quantized["stage_precisions"]["llm"] == "int8"
    assert quantized["precision"] == "int8" and data["visual_tokens"] == quantized["inputs"]["visual_tokens"]
    for block in (base, quantized):
        assert block["peak_host_own_mib"] is not None and block["peak_host_mib"] >= block["host_baseline_mib"]
    assert "ratio onnxruntime/onnxruntime-int8" in r.stdout
    assert "onnxruntime-int8: warm-up 1/1 done (discarded)" in r.stderr and "onnxruntime-int8: repeat 2/2 done" in r.stderr


def test_plot_without_matplotlib_is_refused_before_any_run(engine, tmp_path, monkeypatch):
    """Guards against --plot failing only after the whole benchmark ran."""
    png = tmp_path / "b.png"
    code = "import sys; sys.modules['matplotlib'] = None; from ppllava.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "bench", str(engine), "--synthetic-frames", "4", "--repeat", "1",
                        "--warmup", "0", "--max-new-tokens", "2", "--plot", str(png)], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "matplotlib" in lines[0] and "ppllava[bench]" in lines[0], r.stderr
    assert r.stdout == "" and not png.exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the library's own check, for API callers
    with pytest.raises(bench.InputError, match="needs matplotlib"):
        bench.require_plotting()


def test_plot_shows_p50_p95_settings_and_device(measured, engine, tmp_path):
    """Guards against a picture of medians only, with no spread, numbers, settings or machine."""
    _, options, result, _ = measured
    data = bench.report(engine, options, [result])
    c = bench.chart(data)
    rows = dict(c.rows)
    first = data["backends"]["onnxruntime"]["first_question"]
    for label, stats in (("vision", first["stages_ms"]["vision"]), ("decode", first["stages_ms"]["decode"]),
                         ("time to first token", first["time_to_first_token_ms"])):
        assert rows[label]["onnxruntime"] == (stats["median"], stats["p95"])
    assert "follow-up TTFT" in rows
    settings = " ".join(c.settings)
    for expected in ("4 frames sampled", f"{data['visual_tokens']} visual tokens", f"prompt {data['prompt_tokens']} tokens",
                     "max-new-tokens 3", "onnxruntime: precision fp32; providers cpu; threads default; on cpu",
                     f"CPU {data['machine']['cpu_model']}", "GPU none"):
        assert expected in settings, (expected, settings)
    matplotlib = pytest.importorskip("matplotlib")
    fig = bench.draw(c)
    drawn = " ".join(" ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)).split())
    vision = first["stages_ms"]["vision"]
    assert f"p50 {vision['median']:.3g} / p95 {vision['p95']:.3g} ms" in drawn
    assert "providers cpu" in drawn and "max-new-tokens 3" in drawn and data["machine"]["cpu_model"] in drawn
    matplotlib.pyplot.close(fig)
    png = tmp_path / "b.png"
    assert bench.plot(data, png) == c and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_refused_int8_vision_is_not_retried_for_the_same_engine(engine, tmp_path, monkeypatch):
    # Bug class: every `bench --random-weights` run calibrating and quantizing again (minutes) only
    # to be refused by the same threshold on the same weights; or a refusal that outlives its cause.
    import ppllava.calibration.quantize as quantize
    from ppllava.export.bench_support import int8_vision_variant

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    attempts, lines = [], []
    real = quantize.quantize_stages

    def counted(*args, **kwargs):
        attempts.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_stages", counted)
    monkeypatch.setitem(quantize.THRESHOLDS, "visual_tokens_cosine", 1.5)  # no cosine passes: refused
    assert not int8_vision_variant(copy, tmp_path, lines.append)
    assert len(attempts) == 1 and "int8 vision not recorded (int8 visual tokens reach cosine" in lines[-1]
    assert not int8_vision_variant(copy, tmp_path, lines.append)
    assert len(attempts) == 1 and "int8 vision was refused for this engine before (visual-token cosine min" in lines[-1]
    monkeypatch.setitem(quantize.THRESHOLDS, "visual_tokens_cosine", -1.0)  # another threshold: tried again
    assert int8_vision_variant(copy, tmp_path, lines.append)
    assert len(attempts) == 2 and "int8 vision recorded" in lines[-1]


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni amx_int8 amx_tile

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: avx2 sve
"""
ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd aes asimddp i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd42
"""


def test_cpu_features_names_the_generation_and_the_kernel_extensions():
    # Bug class: a VM's "Intel(R) Xeon(R) Processor" says neither which Xeon nor which kernels run,
    # so two benches of that name could not be told apart.
    assert bench.cpu_features(X86_CPUINFO) == {"cpu_id": "GenuineIntel 6/207/2",
                                                "cpu_isa": ["avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"]}
    assert bench.cpu_features(ARM_CPUINFO) == {"cpu_id": "0x41/0xd42", "cpu_isa": ["asimd", "asimddp", "i8mm"]}
    assert bench.cpu_features("") == {} and bench.cpu_features("processor\t: 0\nBogoMIPS\t: 1\n") == {}
    data = {"settings": {"video": None, "synthetic_frames": 8, "tokens": None, "max_new_tokens": 4, "questions": 1,
                         "repeat": 1, "warmup": 0},
            "machine": {"cpu_model": "Intel(R) Xeon(R) Processor", **bench.cpu_features(X86_CPUINFO), "cpu_count": 2,
                        "cpu_usable": 2, "gpu": None},
            "engine": "engine", "timestamp_utc": "2026-12-02T00:00:00+00:00", "sampled_frames": 8, "visual_tokens": 100,
            "prompt_tokens": 146, "backends": {}, "versions": {"ppllava": "0"}}
    line = next(line for line in bench.settings_lines(data) if line.startswith("CPU "))
    assert line.startswith("CPU Intel(R) Xeon(R) Processor (GenuineIntel 6/207/2; avx2 fma avx512f avx512_vnni amx_int8; 2 of 2")


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", "affinity"), ("150000 100000\n", 2),
                                                ("50000 100000\n", 1), ("garbled\n", "affinity"), (None, "affinity")])
def test_usable_cores_is_the_affinity_capped_by_a_cgroup_quota(tmp_path, monkeypatch, cpu_max, expected):
    from ppllava.runtime import host

    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(host, "CPU_MAX", tmp_path / "cpu.max")  # absent unless written
    if cpu_max is not None:
        host.CPU_MAX.write_text(cpu_max)
    assert host.usable_cores() == (4 if expected == "affinity" else expected)


def test_repeats_probe_before_each_measured_repeat_and_after_the_last():
    events = []
    result = bench.BackendResult("b")
    options = bench.BenchOptions(warmup=1, repeat=2)

    def probe():
        events.append("probe")
        return {"n": len(events)}

    for r in bench.repeats(options, result, probe, log_line=lambda line: events.append("said")):
        events.append(r)
    assert events == [0, "said", 1, "said", "probe", 2, "said", "probe", 3, "said", "probe"]
    assert len(result.probes) == options.repeat + 1


def test_repeats_that_end_early_do_not_probe_or_say_more():
    """A repeat that raises (a failed answer) leaves no progress line and no closing probe behind."""
    events = []
    result = bench.BackendResult("b")
    with pytest.raises(RuntimeError):
        for r in bench.repeats(bench.BenchOptions(warmup=0, repeat=3), result, lambda: events.append("probe"),
                               log_line=lambda line: events.append("said")):
            events.append(r)
            if r == 1:
                raise RuntimeError("the answer failed")
    assert events == [0, "said", "probe", 1]
