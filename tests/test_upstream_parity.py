"""Parity with the original code on its own outputs (tests/data/upstream, see its README).

Guards against every silent deviation from upstream semantics (BT-Adapter layout, pooling order,
position tables, splicing, pad handling, generation) that a self-consistent reimplementation
would never notice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ppllava import PPLLaVA
from ppllava.tiny import make_tiny

DATA = Path(__file__).parent / "data" / "upstream"
CASES = sorted(p.stem for p in DATA.glob("*.npz"))


@pytest.fixture(scope="module")
def upstream_models(tmp_path_factory):
    expected = json.loads((DATA / "checkpoints.json").read_text())["checkpoint_sha256"]
    models = {}
    for variant, sha in expected.items():
        path = make_tiny(tmp_path_factory.mktemp(variant), variant, seed=0)
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        assert digest == sha, (
            f"make_tiny({variant!r}, seed=0) no longer writes the checkpoint the fixtures were computed on "
            "(tests/data/upstream/README.md says how to regenerate them)"
        )
        models[variant] = PPLLaVA.from_pretrained(path)
    return models


def load_case(name):
    with np.load(DATA / f"{name}.npz") as f:
        case = {k: f[k] for k in f.files}
    media = str(case.pop("media_type"))
    tensors = {k: torch.from_numpy(v) for k, v in case.items()}
    return tensors, media


@pytest.mark.parametrize("name", CASES)
def test_matches_upstream(upstream_models, name):
    case, media = load_case(name)
    model = upstream_models[name.split("_")[0]]
    padded = not bool(case["attention_mask"].all())
    inputs = dict(pixel_values=case["pixel_values"], clip_ids=case["clip_ids"], clip_mask=case.get("clip_mask"), media_type=media)
    with torch.no_grad():
        logits = model(case["input_ids"], attention_mask=case["attention_mask"] if padded else None, **inputs).logits
    want = case["logits"]
    if padded:
        # A padded position attends to nothing; its logits are undefined in both implementations.
        keep = case["attention_mask"][0].bool()
        pos = int((case["input_ids"][0] == model.config.image_token_index).nonzero()[0])
        visual = torch.ones(logits.shape[1] - case["input_ids"].shape[1] + 1, dtype=torch.bool)
        rows = torch.cat([keep[:pos], visual, keep[pos + 1 :]])
        logits, want = logits[:, rows], want[:, rows]
    err = (logits - want).abs().max().item()
    assert err <= 1e-4, f"{name}: logits differ from upstream by {err:.2e} (> 1e-4)"
    if "visual_tokens" not in case:
        return
    with torch.no_grad():
        pooled = model.multi_modal_projector.clip_text_model(
            input_ids=case["clip_ids"], attention_mask=case.get("clip_mask")
        ).pooler_output
        features = model.vision_features(case["pixel_values"])
        tokens = model.visual_tokens(case["pixel_values"], case["clip_ids"], case.get("clip_mask"), media)
    f_err = (features - case["vision_hidden_selected"]).abs().max().item()
    t_err = (tokens - case["visual_tokens"]).abs().max().item()
    p_err = (pooled - case["clip_text_pooled"]).abs().max().item()
    assert p_err <= 1e-5, f"{name}: alignment text tower output differs from upstream by {p_err:.2e}"
    assert f_err <= 1e-5, f"{name}: vision features differ from upstream by {f_err:.2e}"
    assert t_err <= 1e-5, f"{name}: visual tokens differ from upstream by {t_err:.2e} (> 1e-5)"
    new = model.generate(case["input_ids"], max_new_tokens=8, **inputs)
    assert new[0].tolist() == case["generated_new_tokens"].tolist(), f"{name}: greedy tokens differ from upstream"
