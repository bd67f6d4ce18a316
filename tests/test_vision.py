"""Vision tower with BT-Adapter. Guards against the dead-layer rewrite drifting from the plain form,
against frame-count special cases (T=1, T=3), and against frames not being mixed in time."""

from __future__ import annotations

import pytest
import torch

from ppllava import PPLLaVA
from ppllava.errors import InputError
from ppllava.tiny import make_tiny

pytestmark = pytest.mark.numerics  # floating-point verdicts: CI reruns them under ATEN_CPU_CAPABILITY=default


@pytest.mark.parametrize("variant", ["vicuna", "qwen"])
@pytest.mark.parametrize("frames", [1, 3, 4, 5])
def test_skipping_unused_layers_is_exact(tiny_models, variant, frames):
    model = tiny_models[variant]
    px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(frames))
    fast = model.vision_features(px)
    plain = model.vision_features(px, plain=True)
    assert fast.shape == (frames, 36, 32)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)


@pytest.mark.parametrize("depth,layer", [(1, -2), (4, -2), (2, -1), (3, -3), (2, 1)])
def test_rewrite_exact_for_other_depths_and_layers(tmp_path, depth, layer):
    path = make_tiny(tmp_path / "c", "vicuna", seed=3, btadapter_depth=depth, vision_feature_layer=layer)
    model = PPLLaVA.from_pretrained(path)
    px = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.vision_features(px), model.vision_features(px, plain=True), rtol=0, atol=0)


def test_btadapter_mixes_frames(tiny_models):
    model = tiny_models["vicuna"]
    px = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    base = model.vision_features(px)
    px2 = px.clone()
    px2[2] += 1.0
    changed = model.vision_features(px2)
    # frame 0's features depend on frame 2 through the temporal branch: T=3 is an ordinary clip.
    assert (changed[0] - base[0]).abs().max() > 1e-4


def test_siglip_frames_are_independent(tiny_models):
    model = tiny_models["qwen"]
    px = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    base = model.vision_features(px)
    px[2] += 1.0
    torch.testing.assert_close(model.vision_features(px)[0], base[0], rtol=0, atol=1e-6)


def test_frame_limits(tiny_models):
    model = tiny_models["vicuna"]
    with pytest.raises(InputError, match="max_T"):
        model.vision_features(torch.zeros(9, 3, 42, 42))
    with pytest.raises(InputError, match=r"\(T, 3, 42, 42\)"):
        model.vision_features(torch.zeros(2, 3, 40, 42))
