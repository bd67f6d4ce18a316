"""The tiny checkpoints use exactly the upstream layout shown in ../shared/formats.

Guards against a parameter name or shape that only our own loader would accept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

FORMATS = Path(__file__).resolve().parents[2] / "shared" / "formats"


def upstream_keys(variant):
    keys = {}
    for line in (FORMATS / f"ppllava_{variant}_tiny.keys.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.mark.skipif(not FORMATS.is_dir(), reason="../shared/formats is not beside this checkout")
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_tiny_checkpoint_has_upstream_keys_and_config(tiny_dirs, variant):
    with safe_open(str(tiny_dirs[variant] / "model.safetensors"), "pt") as f:
        ours = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert ours == upstream_keys(variant)
    theirs = json.loads((FORMATS / f"ppllava_{variant}_tiny.config.json").read_text())
    mine = json.loads((tiny_dirs[variant] / "config.json").read_text())
    for key in ("model_type", "btadapter", "frame_shape", "pooling_kernel", "pooling_stride", "image_token_index",
                "vision_feature_layer", "vision_feature_select_strategy", "pad_token_id", "clip_weight"):
        assert mine[key] == theirs[key], key


@pytest.mark.skipif(not FORMATS.is_dir(), reason="../shared/formats is not beside this checkout")
@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
def test_upstream_example_configs_load(tmp_path, variant):
    """The example config.json files from ../shared/formats parse and validate as they are."""
    from ppllava.alignment import AlignmentConfig
    from ppllava.config import PPLLaVAConfig

    cfg = PPLLaVAConfig.from_file(FORMATS / f"ppllava_{variant}_tiny.config.json")
    assert cfg.variant == variant and cfg.visual_token_count(4) == 8
    raw = json.loads((FORMATS / f"ppllava_{variant}_tiny.clip_weight.config.json").read_text())
    align = AlignmentConfig.from_dict(raw, "formats")
    assert align.positions == (248 if variant == "vicuna" else 196)
