"""onnxruntime-genai's own view of an engine's llm/ directory (shared by the interop tests)."""

from __future__ import annotations

import json

import pytest


def genai_model(engine):
    """``og.Model`` of ``engine/llm`` after checking what it refused once: end-of-sequence ids past
    the vocabulary (the builder added one). Returns (og module, model, eos ids)."""
    og = pytest.importorskip("onnxruntime_genai")
    config = json.loads((engine / "llm" / "genai_config.json").read_text())["model"]
    ids = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert ids and all(0 <= i < config["vocab_size"] for i in ids), (ids, config["vocab_size"])
    model = og.Model(str(engine / "llm"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=8)
    try:  # our graph takes inputs_embeds, which og's plain Generator does not feed: only its config checks matter
        og.Generator(model, params)
    except RuntimeError as exc:
        assert "eos_token_id" not in str(exc), exc  # was: "eos_token_id (49154) must be in range [0, 49153)"
    return og, model, ids
