"""What the interop tests share: onnxruntime-genai's own view of an engine's llm/ directory, and
what a tool reading llm_hf/ gets as its tokenizer."""

from __future__ import annotations

import json

import pytest

from ppllava.runtime.manifest import Manifest


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


# Runs of whitespace, digits, emoji, CJK, accents, a control token typed as text, a lone "▁"
TEXTS = ["Hello world!", "  two  spaces\tand a tab\n\nnew lines", "3.14159 and 1,000,000 and 2026-12-01",
         "🚀 emoji 😶‍🌫️ and 我想在apple工作", "café naïve Ελληνικά нещо", "<s> typed </s>", "▁ lone marker ▁x"]


def engine_tokenizer(engine):
    from tokenizers import Tokenizer

    manifest = Manifest.load(engine)
    return Tokenizer.from_file(str(engine / manifest.data["llm"]["tokenizer"])), engine / manifest.data["llm"]["hf_dir"]


def check_llm_hf_tokenizer(engine, texts=TEXTS):
    """What a tool reading llm_hf/ gets is the engine's tokenizer: the same ids and text for every
    input, and no token past the embedding table. Returns (AutoTokenizer, config.json)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours, hf_dir = engine_tokenizer(engine)
    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    # a model-specific class (LlamaTokenizerFast) appends its default "<s>", "</s>", "<unk>" as new tokens
    assert type(tokenizer) is PreTrainedTokenizerFast, type(tokenizer)
    assert len(tokenizer) == ours.get_vocab_size(with_added_tokens=True), (len(tokenizer), ours.get_vocab_size())
    assert max(tokenizer.get_vocab().values()) < config["vocab_size"], (len(tokenizer), config["vocab_size"])
    for text in texts:
        for special in (True, False):
            want = ours.encode(text, add_special_tokens=special).ids
            got = tokenizer(text, add_special_tokens=special)["input_ids"]
            assert got == want, (text, special, got, want)
        for skip in (True, False):
            assert tokenizer.decode(want, skip_special_tokens=skip) == ours.decode(want, skip_special_tokens=skip), text
    settings = json.loads((hf_dir / "tokenizer_config.json").read_text())
    for kind in ("bos", "eos", "unk", "pad"):  # named by strings the tokenizer holds, never invented ones
        if f"{kind}_token" in settings:
            assert ours.token_to_id(settings[f"{kind}_token"]) is not None, (kind, settings[f"{kind}_token"])
    assert json.loads((hf_dir / "special_tokens_map.json").read_text()) == {
        k: v for k, v in settings.items() if k.removesuffix("_token") in ("bos", "eos", "unk", "pad")}
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert tokenizer.eos_token_id in eos, (tokenizer.eos_token, eos)
    return tokenizer, config
