"""An engine's LLM loads in the tools people already use: ``llm_hf/`` as transformers' AutoTokenizer
reads it (so do onnxruntime-genai's builder and llama.cpp's convert_hf_to_gguf.py), ``llm/`` in
onnxruntime-genai's own ``og.Model``. llama.cpp itself is not needed here; test_smollm2.py checks a
real tokenizer the same way, and benchmarks/llamacpp_decode.py converts one.
"""

from __future__ import annotations

import json
import logging

import pytest

from genai import TEXTS, check_llm_hf_tokenizer, engine_tokenizer, genai_model
from ppllava.runtime.manifest import Manifest

VARIANTS = ("vicuna", "qwen")


@pytest.mark.parametrize("variant", VARIANTS)
def test_llm_hf_tokenizer_is_the_engines(tiny_engine, variant):
    """Guards against llm_hf/ tokenizer files that other tools read as another tokenizer (a
    tokenizer config without class or token strings made transformers append three tokens past
    the embedding table, which llama.cpp's converter then wrote into the GGUF)."""
    tokenizer, config = check_llm_hf_tokenizer(tiny_engine(variant))
    assert tokenizer.bos_token_id in (None, config.get("bos_token_id")), (tokenizer.bos_token, config.get("bos_token_id"))


def _spm_styled(tokenizer_json: dict) -> dict:
    """The form transformers' GGUF loader gives a byte-level BPE: byte fallback on, SentencePiece decoder."""
    spm = json.loads(json.dumps(tokenizer_json))
    spm["model"]["byte_fallback"] = True
    spm["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        spm["decoder"]]}
    return spm


def test_byte_level_form_changes_nothing_it_can_see(tiny_engine):
    """Guards against rewriting a tokenizer that then encodes or decodes differently: the inert
    byte-fallback/SentencePiece steps go only where they provably cannot act."""
    from tokenizers import Tokenizer

    from ppllava.export.llm import byte_level_form

    ours, _ = engine_tokenizer(tiny_engine("vicuna"))
    plain = json.loads(ours.to_str())
    spm = _spm_styled(plain)
    rewritten = byte_level_form(spm)
    assert rewritten is not spm and not rewritten["model"]["byte_fallback"] and rewritten["decoder"] == plain["decoder"]
    before, after = Tokenizer.from_str(json.dumps(spm)), Tokenizer.from_str(json.dumps(rewritten))
    for text in TEXTS:
        ids = before.encode(text).ids
        assert after.encode(text).ids == ids and after.decode(ids, skip_special_tokens=False) == before.decode(
            ids, skip_special_tokens=False), text
    assert byte_level_form(plain) is plain  # already plain
    with_piece = json.loads(json.dumps(spm))  # a byte piece the ByteFallback decoder would turn into "A"
    with_piece["model"]["vocab"]["<0x41>"] = max(with_piece["model"]["vocab"].values()) + 1
    assert byte_level_form(with_piece) is with_piece
    spaced = json.loads(json.dumps(spm))  # a token ByteLevel keeps verbatim: fusing changes what it decodes
    spaced["added_tokens"].append({**spaced["added_tokens"][-1], "id": spaced["added_tokens"][-1]["id"] + 1,
                                   "content": "<two words>"})
    assert byte_level_form(spaced) is spaced


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_llm_loads_in_onnxruntime_genai(tiny_engine, variant):
    """Guards against an llm/ directory onnxruntime-genai's own Model refuses (the builder once
    wrote an end-of-sequence id past the vocabulary into genai_config.json) or whose tokenizer it
    reads as another one."""
    engine = tiny_engine(variant)
    og, model, _ = genai_model(engine)
    ours, _ = engine_tokenizer(engine)
    tokenizer = og.Tokenizer(model)  # the builder's copy of llm_hf's tokenizer files, read by og's own tokenizer
    for text in TEXTS:
        want = ours.encode(text).ids
        assert [int(i) for i in tokenizer.encode(text)] == want, text
        assert tokenizer.decode(want) == ours.decode(want, skip_special_tokens=True), text


def test_a_checkpoints_sentencepiece_model_travels_to_llm_hf(tiny_dirs, tmp_path):
    # Bug class: a Vicuna engine whose llm_hf/ lacks the tokenizer.model that llama.cpp's converter
    # reads a LLaMA vocabulary from (scores and token types); the engine's own tokenization unchanged.
    import shutil

    from ppllava.export.engine import ExportOptions, export_engine
    from ppllava.runtime.manifest import file_records

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_dirs["vicuna"], checkpoint)
    model = bytes(range(256)) * 8  # the file is carried, not read: any bytes stand in for a SentencePiece model
    (checkpoint / "tokenizer.model").write_bytes(model)
    engine = tmp_path / "engine"
    export_engine(ExportOptions(checkpoint, engine, llm="none"), report=lambda _: None)
    manifest = Manifest.load(engine).data
    hf_dir = engine / manifest["llm"]["hf_dir"]
    assert (hf_dir / "tokenizer.model").read_bytes() == model
    recorded = manifest["files"]  # checksummed like every file of the engine dir
    assert recorded["llm_hf/tokenizer.model"] == file_records(engine, [hf_dir / "tokenizer.model"])["llm_hf/tokenizer.model"]
    check_llm_hf_tokenizer(engine)


def test_importing_the_builder_leaves_the_programs_logging_alone():
    """Guards against the builder's import (onnxruntime's matmul_nbits_quantizer calls
    logging.basicConfig at INFO) switching on every library's INFO records in a program that embeds
    ppllava.export without configuring logging. In a fresh interpreter: the import happens there."""
    import subprocess
    import sys

    code = ("import logging, sys\n"
            "from ppllava.export.llm import _import_builder\n"
            "_import_builder()\n"
            "assert 'onnxruntime.quantization.matmul_nbits_quantizer' in sys.modules\n"
            "root = logging.getLogger()\n"
            "print(len(root.handlers), root.level)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", str(logging.WARNING)], done.stdout
