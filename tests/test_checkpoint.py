"""Loader: exact round trips in every upstream layout, strictness, clear errors for broken input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppllava import PPLLaVA
from ppllava.alignment import PRESETS, resolve_alignment_config
from ppllava.errors import CheckpointError, ConfigError
from ppllava.tiny import make_tiny, random_state_dict, tiny_configs, write_checkpoint


@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
@pytest.mark.parametrize("layout", [dict(), dict(shards=3), dict(weights_format="bin")])
def test_round_trip_is_exact(tmp_path, variant, layout):
    config, alignment = tiny_configs(variant)
    state = random_state_dict(config, alignment, seed=5)
    path = write_checkpoint(tmp_path / "c", config, alignment, state=state, **layout)
    model = PPLLaVA.from_pretrained(path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_make_tiny_is_deterministic(tmp_path):
    a = load_file(str(make_tiny(tmp_path / "a", "vicuna", seed=3) / "model.safetensors"))
    b = load_file(str(make_tiny(tmp_path / "b", "vicuna", seed=3) / "model.safetensors"))
    c = load_file(str(make_tiny(tmp_path / "c", "vicuna", seed=4) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


_DIGESTS = """
import hashlib, json, sys, tempfile
from pathlib import Path
import torch
from ppllava.tiny import make_tiny
out = {}
for variant in ("vicuna", "qwen"):
    with tempfile.TemporaryDirectory() as tmp:  # this subprocess runs once per kernel set: leave nothing behind
        path = make_tiny(Path(tmp) / variant, variant, seed=0)
        out[variant] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "sha256": out}))
"""


@pytest.mark.numerics
def test_make_tiny_is_the_same_bytes_under_every_kernel_set():
    """Guards against seeded checkpoints that depend on the CPU: torch.randn's vectorised sampler
    draws other numbers under another SIMD width, so fixtures computed on one machine would not
    match the checkpoint rebuilt on another. The fixtures' recorded SHA-256 must come out under
    every ATen kernel set this CPU offers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "data" / "upstream" / "checkpoints.json").read_text())
    seen = {}
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        r = subprocess.run([sys.executable, "-c", _DIGESTS], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        seen[result["capability"]] = result["sha256"]  # an unsupported request falls back to a lower set
    assert "DEFAULT" in seen, seen
    for capability, digests in seen.items():
        assert digests == recorded["checkpoint_sha256"], f"make_tiny(seed=0) under {capability}: {digests}"


def _rewrite(path, change):
    state = load_file(str(path / "model.safetensors"))
    change(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_key_is_named(tmp_path):
    path = make_tiny(tmp_path / "c", "vicuna")
    _rewrite(path, lambda s: s.pop("vision_tower.vision_model.btadapter_cls_token"))
    with pytest.raises(CheckpointError, match="1 missing: vision_tower.vision_model.btadapter_cls_token"):
        PPLLaVA.from_pretrained(path)


def test_unexpected_key_is_named(tmp_path):
    path = make_tiny(tmp_path / "c", "qwen")
    _rewrite(path, lambda s: s.__setitem__("language_model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="1 unexpected: language_model.extra.weight"):
        PPLLaVA.from_pretrained(path)


def test_wrong_shape_is_named(tmp_path):
    path = make_tiny(tmp_path / "c", "vicuna")
    _rewrite(path, lambda s: s.__setitem__("image_newline", torch.zeros(65)))
    with pytest.raises(CheckpointError, match=r"wrong shape: image_newline \[65\] \(expected \[64\]\)"):
        PPLLaVA.from_pretrained(path)


def test_missing_shard(tmp_path):
    config, alignment = tiny_configs("vicuna")
    path = write_checkpoint(tmp_path / "c", config, alignment, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="1 are missing: model-00002-of-00002.safetensors"):
        PPLLaVA.from_pretrained(path)


def test_truncated_weights(tmp_path):
    path = make_tiny(tmp_path / "c", "qwen")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        PPLLaVA.from_pretrained(path)


def test_no_weights(tmp_path):
    path = make_tiny(tmp_path / "c", "qwen")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        PPLLaVA.from_pretrained(path)


class NotATensor:  # a pickled object that weights_only=True must refuse
    pass


def test_bin_is_loaded_safely(tmp_path):
    path = make_tiny(tmp_path / "c", "qwen")
    (path / "model.safetensors").unlink()

    torch.save({"x": NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        PPLLaVA.from_pretrained(path)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(pooling="pllava"), "pooling='pllava' is not supported"),
        (dict(btadapter_depth=5), "btadapter_depth=5"),
        (dict(frame_shape=[5, 5]), "frame_shape"),
        (dict(pooling_kernel=None, pooling_stride=None), "video pooling"),
        (dict(pooling_kernel="(2,3)"), "pooling_kernel"),
        (dict(vision_feature_layer=-9), "vision_feature_layer"),
        (dict(model_type="llava"), "model_type"),
        (dict(extend_clip=False), "extend_clip"),
        (dict(pooling_temp=0), "pooling_temp"),
    ],
)
def test_bad_config(tmp_path, change, message):
    path = make_tiny(tmp_path / "c", "vicuna")
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        PPLLaVA.from_pretrained(path)


def test_config_strings_are_parsed_not_evaluated(tmp_path):
    path = make_tiny(tmp_path / "c", "vicuna", pooling_kernel="(2,3,3)", pooling_stride="(2, 3, 3)")
    assert PPLLaVA.from_pretrained(path).config.pooling.kernel == (2, 3, 3)
    (path / "config.json").write_text((path / "config.json").read_text().replace('"(2,3,3)"', '"__import__(\'os\')"'))
    with pytest.raises(ConfigError, match="pooling_kernel"):
        PPLLaVA.from_pretrained(path)


def test_invalid_json(tmp_path):
    path = make_tiny(tmp_path / "c", "vicuna")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PPLLaVA.from_pretrained(path)


def test_alignment_config_lookup(tmp_path):
    path = make_tiny(tmp_path / "c", "vicuna")
    moved = tmp_path / "elsewhere"
    (path / "clip_tiny").rename(moved)
    with pytest.raises(ConfigError, match="--alignment-config"):
        PPLLaVA.from_pretrained(path)
    model = PPLLaVA.from_pretrained(path, alignment_config=moved)
    assert model.alignment.text["hidden_size"] == 32
    # public ids resolve to built-in presets
    for name, kind in (("openai/clip-vit-large-patch14-336", "vicuna"), ("google/siglip-so400m-patch14-384", "qwen")):
        cfg = resolve_alignment_config(tmp_path, name, kind)
        assert cfg.source == f"preset {name}"
        assert cfg.positions == (248 if kind == "vicuna" else 196)
    assert PRESETS["openai/clip-vit-large-patch14-336"]["text_config"]["hidden_act"] == "quick_gelu"


def test_dtype_and_tied_embeddings(tmp_path):
    config, alignment = tiny_configs("qwen")
    config["text_config"]["tie_word_embeddings"] = True
    path = write_checkpoint(tmp_path / "c", config, alignment, seed=2)
    assert "language_model.lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model = PPLLaVA.from_pretrained(path, dtype=torch.bfloat16)
    lm = model.language_model
    assert lm.lm_head.weight.dtype == torch.bfloat16
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()


def test_bad_loading_options(tiny_dirs):
    from ppllava.errors import InputError

    with pytest.raises(InputError, match="dtype"):
        PPLLaVA.from_pretrained(tiny_dirs["qwen"], dtype="float8")
    with pytest.raises(InputError, match="not available"):
        PPLLaVA.from_pretrained(tiny_dirs["qwen"], device="cuda:7")


def test_non_float_weights_and_bad_generation_config(tmp_path):
    path = make_tiny(tmp_path / "c", "qwen")
    _rewrite(path, lambda s: s.__setitem__("image_newline", torch.zeros(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="non-float"):
        PPLLaVA.from_pretrained(path)
    path = make_tiny(tmp_path / "d", "qwen")
    (path / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation config"):
        PPLLaVA.from_pretrained(path)
    (path / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    assert PPLLaVA.from_pretrained(path).eos_token_ids == {7, 9}


def test_garbage_safetensors(tmp_path):
    path = make_tiny(tmp_path / "c", "qwen")
    (path / "model.safetensors").write_bytes(b"\x11\x00\x00\x00\x00\x00\x00\x00[1,2,3,4,5,6,7,8]")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        PPLLaVA.from_pretrained(path)
