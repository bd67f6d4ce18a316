"""The GPU kit's own arithmetic and refusals (benchmarks/gpu_kit.py; its whole run is rehearsed on
the CPU by .ci/tf5.sh)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

KIT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kit.py"


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llm_hf(tmp_path: Path, **config) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    hf = tmp_path / "engine" / "llm_hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 3,
                                                **config}))
    save_file({"model.embed_tokens.weight": np.zeros((10, 8), np.float32),
               "model.layers.0.mlp.up_proj.weight": np.zeros((16, 8), np.float32),
               "lm_head.weight": np.zeros((10, 8), np.float32)}, str(hf / "model.safetensors"))
    return hf.parent


def test_decode_floor_counts_weights_once_and_the_kv_cache_at_the_mean_position(kit, tmp_path):
    engine = _llm_hf(tmp_path, num_key_value_heads=1)
    options = SimpleNamespace(max_new_tokens=10)
    position = kit.mean_position({"prompt_tokens": 100}, options)
    assert position == 104  # steps read 100 .. 108 positions (the prefill made the first token)
    got = kit.decode_bytes(engine, 2, position)
    weights = (8 + 16 * 8 + 10 * 8) * 2  # one embedding row, the MLP, lm_head
    kv = 2 * 3 * 1 * (8 // 2) * 104 * 2  # keys and values, 3 layers, 1 KV head of 4
    assert (got["weight_bytes"], got["kv_cache_bytes"], got["floor_bytes"]) == (weights, kv, weights + kv)
    full_heads = kit.decode_bytes(_llm_hf(tmp_path / "b"), 2, position)  # no num_key_value_heads: every head
    assert full_heads["kv_cache_bytes"] == 2 * kv
    with pytest.raises(ValueError, match="prompt"):
        kit.mean_position({}, options)


def test_nominal_bandwidth_is_matched_by_name_prefix(kit):
    block = {"first_question": {"decode_ms_per_token": {"median": 4.0}}}
    data = {"backends": {"torch": block, "torch-eager": block}, "ratios": {}}
    weights = {"floor_bytes": 4800e9 * 2e-3}  # 2 ms at 4800 GB/s
    greedy = {"verdict": "identical", "top1_agreement": 1.0}
    for name in ("NVIDIA H200", "NVIDIA H200 NVL"):
        s = kit.summary(data, {"best_gbs": 4000.0}, weights, name, greedy)
        assert s["decode_floor_ms_per_token"]["nominal_bandwidth"] == pytest.approx(2.0)
        assert s["decode_vs_floor"]["nominal"] == pytest.approx(2.0)
    assert kit.summary(data, {"best_gbs": 4000.0}, weights, "NVIDIA A100", greedy)["decode_vs_floor"]["nominal"] is None


def test_refusals_are_one_line_and_exit_2(kit, tmp_path, capsys):
    assert kit.main(["--build-only", "--out", str(tmp_path / "k.json")]) == 2
    assert "--build-only needs --work" in capsys.readouterr().err
    work = tmp_path / "work"
    code = kit.main(["--preset", "small", "--device", "cpu", "--work", str(work), "--min-free-gib", "1e9",
                     "--out", str(tmp_path / "k.json")])
    assert code == 2 and "GiB free" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists() and not any(work.iterdir())  # nothing built or written
