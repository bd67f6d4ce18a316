"""Hardware floors in ppllava bench: the machine rates, each stage's FLOPs and bytes from
onnxruntime's profile, and measured / floor in the report.

Guards against floors that cannot be wrong: FLOPs counted from shapes are checked against the
arithmetic of the LLM's own dimensions, weight bytes against its weights file, and the ratios
against the medians they divide."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from ppllava.runtime import floors
from ppllava.runtime.backends.onnxruntime import make_session


def test_embedded_matmul_model_is_the_one_onnx_builds():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", "K"]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, ["K", "N"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", "N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ppllava")
    model.ir_version = 8
    assert onnx.load_from_string(floors.MATMUL_ONNX) == model
    x, w = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(make_session(floors.MATMUL_ONNX).run(None, {"X": x, "W": w})[0], x @ w)


def test_node_flops():
    assert floors.node_flops("MatMul", [[2, 8, 16], [16, 32]], [[2, 8, 32]]) == 2 * 2 * 8 * 16 * 32
    assert floors.node_flops("MatMulInteger", [[8, 16], [16, 32], [], []], [[8, 32]]) == 2 * 8 * 16 * 32
    # Conv: every output element is a (Cin/groups) x kh x kw dot product
    assert floors.node_flops("Conv", [[1, 3, 28, 28], [64, 3, 14, 14], [64]], [[1, 64, 2, 2]]) == 2 * 64 * 4 * 3 * 14 * 14
    assert floors.node_flops("Add", [[4, 4], [4, 4]], [[4, 4]]) == 0.0


def test_rates_are_measured_and_flags_override():
    rates = floors.measure_rates(threads=1, repeat=2)
    assert rates.gemm_gflops > 0.5 and rates.bandwidth_gbs > 0.1 and "measured" in rates.source
    given = floors.given_rates(100.0, None, lambda: rates)
    assert given.gemm_gflops == 100.0 and given.bandwidth_gbs == rates.bandwidth_gbs and "GEMM rate given" in given.source
    both = floors.given_rates(100.0, 20.0, lambda: pytest.fail("nothing to measure when both are given"))
    assert (both.gemm_gflops, both.bandwidth_gbs) == (100.0, 20.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(floors.InputError, match="--bandwidth-gbs must be a finite number > 0"):
            floors.given_rates(None, bad, lambda: rates)


def test_bad_rates_are_refused_before_anything_runs(tiny_engine):
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "bench", str(tiny_engine("vicuna")), "--synthetic-frames",
                        "4", "--gemm-gflops", "-1"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--gemm-gflops must be a finite number > 0" in lines[0], r.stderr


def test_stage_costs_follow_the_models_arithmetic(tiny_engine):
    engine = tiny_engine("vicuna")
    from ppllava.runtime.bench import synthetic_frames

    costs = floors.stage_costs(engine, synthetic_frames(4, size=64), "What happens?", None, None, 1, new_tokens=4)
    assert set(costs) == {"vision", "text", "pool", "prefill", "decode"}
    config = json.loads((engine / "llm" / "genai_config.json").read_text())["model"]
    hidden, vocab = config["decoder"]["hidden_size"], config["vocab_size"]
    weights = sum(p.stat().st_size for p in (engine / "llm").glob("model.onnx*"))
    step = costs["decode"]
    # a step reads every weight of the graph once (the embeddings are outside it): the file's bytes
    assert 0.9 * weights <= step["weight_bytes"] <= 1.05 * weights
    # and multiplies each by one token: 2 FLOPs per weight, attention on top
    assert 0.9 * 2 * step["weight_bytes"] / 4 <= step["flops"] <= 1.5 * 2 * step["weight_bytes"] / 4
    # prefill: the same weights times the prompt's positions, except lm_head, which sees the last one
    prefill = costs["prefill"]
    assert prefill["weight_bytes"] == step["weight_bytes"]
    positions = (prefill["flops"] - 2 * hidden * vocab) / (step["flops"] - 2 * hidden * vocab)
    assert positions > 8  # a prompt of many positions, counted as many
    assert costs["vision"]["flops"] > 0 and costs["vision"]["weight_bytes"] > 0
    rates = floors.Rates(10.0, 1.0, "given")
    table = floors.floors_ms(costs, rates)
    for stage, f in table.items():
        assert f["floor_ms"] == max(f["compute_ms"], f["memory_ms"]) > 0
        assert f["compute_ms"] == pytest.approx(costs[stage]["flops"] / 1e10 * 1e3)


def test_bench_reports_floors_beside_every_run(tiny_engine, tmp_path):
    engine = tiny_engine("vicuna")
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "bench", str(engine), "--synthetic-frames", "4",
                        "--repeat", "1", "--warmup", "0", "--max-new-tokens", "3", "--compare", "fp32",
                        "--gemm-gflops", "50", "--bandwidth-gbs", "10", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["backends"]) == {"onnxruntime", "onnxruntime-fp32"}
    assert data["floors"]["rates"] == {"gemm_gflops": 50.0, "bandwidth_gbs": 10.0,
                                       "source": "given (--gemm-gflops, --bandwidth-gbs)"}
    decode = data["floors"]["stages"]["decode"]
    for name, block in data["backends"].items():
        measured = block["first_question"]["decode_ms_per_token"]["median"]
        assert decode["measured_over_floor"][name] == pytest.approx(measured / decode["floor_ms"])
        vision = data["floors"]["stages"]["vision"]
        assert vision["measured_over_floor"][name] == pytest.approx(
            block["first_question"]["stages_ms"]["vision"]["median"] / vision["floor_ms"])
    assert "floors: fp32 GEMM 50 GFLOP/s" in r.stdout and "decode per token" in r.stdout
    assert "onnxruntime-fp32 / floor" in r.stdout


def test_rate_probe_runs_in_a_helper_process_and_fails_softly(caplog):
    import os

    from ppllava.runtime.rate_probe import RateProbe

    with RateProbe(threads=1, repeat=1) as probe:
        proc = probe.proc
        assert proc is not None and proc.pid != os.getpid()
        first, second = probe(), probe()
        for rates in (first, second):
            assert rates["gemm_gflops"] > 0.5 and rates["bandwidth_gbs"] > 0.1
        proc.kill()  # a helper that died: no exception, no rates, nothing left running
        proc.wait()
        assert probe() is None and probe.proc is None
    with RateProbe(threads=1, repeat=1) as probe:
        proc = probe.proc
    assert probe.proc is None and proc.poll() is not None  # closing ends the helper
    # a helper that cannot start says why, once
    with RateProbe(1, command=[sys.executable, "-c", "import sys; sys.stderr.write('no onnxruntime here\\n'); sys.exit(3)"]) as probe:
        assert probe.proc is None and probe() is None
    assert caplog.text.count("the rate probe stopped (it did not start; no onnxruntime here)") == 1
    # a helper that hangs costs one timeout, then it is gone
    hang = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"]
    with RateProbe(1, command=hang, probe_timeout_s=0.5) as probe:
        proc = probe.proc
        t0 = time.perf_counter()
        assert probe() is None and probe.proc is None and proc.poll() is not None
        assert time.perf_counter() - t0 < 5  # the timeout, then killed at once (it would never read its EOF)
    assert "the rate probe stopped (no answer in 0.5 s)" in caplog.text


def test_each_repeat_is_judged_at_the_rates_probed_around_it():
    from ppllava.runtime.bench import BackendResult, Run

    # 1 GB of weights per decode step, no FLOPs to speak of: the floor is 1 GB / bandwidth
    costs = {"decode": {"flops": 1.0, "weight_bytes": 10**9}}
    best = floors.Rates(100.0, 20.0, "best of 20")
    result = BackendResult("onnxruntime")
    # decode ms/token = decode / (new_tokens - 1): 50, 100, 50 ms per token
    result.first = [Run({"decode": 50.0}, 50.0, 2), Run({"decode": 100.0}, 100.0, 2), Run({"decode": 50.0}, 50.0, 2)]
    rates = [{"gemm_gflops": 100.0, "bandwidth_gbs": bw} for bw in (20.0, 10.0, 10.0, 20.0)]
    result.probes = list(rates)
    data = floors.report(costs, best, [result])
    decode = data["stages"]["decode"]
    # each repeat next to its better probe: before it (20), neither (10), after it (20): floors 50, 100, 50 ms
    assert decode["paired_per_repeat"]["onnxruntime"] == pytest.approx([1.0, 1.0, 1.0])
    assert decode["measured_over_floor"]["onnxruntime"] == pytest.approx(1.0)
    assert decode["measured_over_best_floor"]["onnxruntime"] == pytest.approx(50.0 / 50.0)
    assert data["paired"] == {"onnxruntime": True} and data["probes"]["onnxruntime"] == result.probes
    lines = floors.format_lines(data)
    assert any("4 probes: 10.0-20.0 GB/s" in line for line in lines)
    assert any("1.00x (1.00x)" in line for line in lines)
    # the best rates are the best the whole bench saw: the probes count
    raised = floors.best_rates(floors.Rates(100.0, 15.0, "best of 20"), [result])
    assert (raised.gemm_gflops, raised.bandwidth_gbs) == (100.0, 20.0) and "4 probes" in raised.source
    assert floors.best_rates(best, [BackendResult("torch-eager")]) == best
    # a failed probe: that run is judged against the best rates alone, and marked
    other = BackendResult("onnxruntime-fp32")
    other.first, other.probes = list(result.first), [*rates[:2], None, rates[3]]
    data = floors.report(costs, best, [result, other])
    decode = data["stages"]["decode"]
    assert decode["measured_over_floor"]["onnxruntime-fp32"] == pytest.approx(1.0)  # median 50 / floor 50
    assert "onnxruntime-fp32" not in decode["paired_per_repeat"]
    assert data["paired"] == {"onnxruntime": True, "onnxruntime-fp32": False}
    lines = floors.format_lines(data)
    assert any("rate probes failed for onnxruntime-fp32" in line for line in lines)
    assert any("1.00x (1.00x)" in line and "1.00x*" in line for line in lines)


def test_bench_probes_the_rates_around_every_repeat(tiny_engine, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "ppllava.cli", "bench", str(tiny_engine("vicuna")), "--synthetic-frames",
                        "4", "--repeat", "2", "--warmup", "0", "--max-new-tokens", "3", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    probes = data["backends"]["onnxruntime"]["rate_probes"]
    assert len(probes) == 3 and all(p["bandwidth_gbs"] > 0 for p in probes)  # before each repeat, after the last
    assert data["floors"]["paired"] == {"onnxruntime": True} and data["floors"]["probes"]["onnxruntime"] == probes
    assert data["floors"]["rates"]["bandwidth_gbs"] >= max(p["bandwidth_gbs"] for p in probes)
    assert "each repeat / its floor at the rates probed just before and after it" in r.stdout
