"""The language model for the engine dir.

1. ``llm_hf/``: a standard Hugging Face directory extracted from the checkpoint (weights, config,
   generation config, tokenizer). Quantization and TensorRT-LLM conversion start from it.
2. ``llm/``: ONNX built from it by onnxruntime-genai's model builder with ``exclude_embeds``, so it
   takes ``inputs_embeds`` (the visual tokens are spliced in before the LLM) and keeps a KV cache.
3. ``embeddings.safetensors``: the token-embedding table and ``image_newline``, which the runtime
   needs to embed text tokens and close an image's tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ppllava.errors import LLMExportError

log = logging.getLogger(__name__)

BUILDER_PRECISION = {torch.float32: "fp32", torch.float16: "fp16"}


def extract_hf_llm(model, out_dir: Path, tokenizer_dir: Path | None, dtype: torch.dtype,
                   checkpoint: Path | None = None) -> Path:
    """Save the LLM as a plain transformers directory (config, safetensors, generation config,
    tokenizer). A ``checkpoint`` that ships a SentencePiece ``tokenizer.model`` (a LLaMA / Vicuna
    one) gives llm_hf/ that file too, unchanged: llama.cpp's converter reads a LLaMA vocabulary from
    it, scores and token types included, and takes tokenizer.json alone for a GPT-2-style one."""
    from transformers import GenerationConfig

    llm = model.language_model
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in llm.state_dict().items()}
    llm.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    config = json.loads((out_dir / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = sorted(model.eos_token_ids)
    GenerationConfig(
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        bos_token_id=llm.config.bos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
    ).save_pretrained(str(out_dir))
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        write_hf_tokenizer(tokenizer_dir, out_dir, config, model.eos_token_ids, model.config.pad_token_id)
    if checkpoint is not None and (checkpoint / "tokenizer.model").is_file():
        shutil.copy2(checkpoint / "tokenizer.model", out_dir / "tokenizer.model")
    return out_dir


# The tokenizer files of llm_hf/ are read by tools that know nothing of the engine: transformers'
# AutoTokenizer (quantizers, onnxruntime-genai's builder) and llama.cpp's convert_hf_to_gguf.py.
# The engine's tokenizer config holds ids only; given no class and no token strings, AutoTokenizer
# takes the config's model type (LlamaTokenizerFast for a LLaMA), whose defaults "<s>", "</s>",
# "<unk>" it appends as new tokens when the vocabulary lacks them: SmolLM2's 49,153 ids became
# 49,156, past the embedding table (the converter wrote 49,156 tokens for 49,153 rows, and the
# builder's "eos" 49,154). So the files name the generic fast class and the token strings the
# tokenizer itself holds; nothing is invented.
SPECIAL_TOKENS = ("bos", "eos", "unk", "pad")


def write_hf_tokenizer(tokenizer_dir: Path, out_dir: Path, config: dict, eos_ids, pad_id: int | None) -> None:
    """tokenizer.json (see ``byte_level_form``), tokenizer_config.json and special_tokens_map.json
    in ``out_dir`` for the engine's LLM tokenizer in ``tokenizer_dir``; ``config`` is the LLM's
    config.json, ``eos_ids`` the ids generation stops on, ``pad_id`` the checkpoint's pad id."""
    from tokenizers import Tokenizer

    source = tokenizer_dir / "tokenizer.json"
    spec = json.loads(source.read_text(encoding="utf-8"))
    plain = byte_level_form(spec)
    if plain is spec:
        shutil.copy2(source, out_dir / "tokenizer.json")
    else:
        log.info("llm_hf tokenizer.json: byte-level BPE written without its inert byte-fallback/SentencePiece decoder steps")
        Tokenizer.from_str(json.dumps(plain)).save(str(out_dir / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    engine = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()) if (
        tokenizer_dir / "tokenizer_config.json").is_file() else {}
    rows = int(config["vocab_size"])
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if top >= rows:
        log.warning("the LLM tokenizer has ids up to %d but the LLM embeds %d rows: tools that read llm_hf/ "
                    "(llama.cpp's converter asserts every id < vocab_size) will refuse it", top, rows)
    eos_ids = sorted(eos_ids)
    wanted = {  # the tokenizer's own ids first; for eos, one generation stops on (the engine's may differ)
        "bos": engine.get("bos_token_id", config.get("bos_token_id")),
        "eos": engine.get("eos_token_id") if engine.get("eos_token_id") in eos_ids or not eos_ids else eos_ids[0],
        "unk": engine.get("unk_token_id"),
        "pad": engine.get("pad_token_id", pad_id),
    }
    if wanted["unk"] is None and spec.get("model", {}).get("unk_token") is not None:
        wanted["unk"] = tokenizer.token_to_id(spec["model"]["unk_token"])
    strings = {}
    for kind in SPECIAL_TOKENS:
        token = tokenizer.id_to_token(int(wanted[kind])) if isinstance(wanted[kind], int) else None
        if token is not None:
            strings[f"{kind}_token"] = token
    # what the post-processor adds around one sequence, as transformers and the converter describe it
    probe = tokenizer.encode("a")
    body = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
    before, after = probe.ids[: body[0]], probe.ids[body[-1] + 1:]
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **strings,
        "add_bos_token": "bos_token" in strings and before == [tokenizer.token_to_id(strings["bos_token"])],
        "add_eos_token": "eos_token" in strings and after == [tokenizer.token_to_id(strings["eos_token"])],
        "clean_up_tokenization_spaces": False,  # decode as the tokenizers library (and the engine) does
        "model_max_length": int(config.get("max_position_embeddings") or 2**31 - 1),
    }
    if engine.get("chat_template"):
        settings["chat_template"] = engine["chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(strings, indent=2, ensure_ascii=False) + "\n")


def byte_level_form(spec: dict) -> dict:
    """A byte-level BPE tokenizer.json without byte-fallback and SentencePiece decoder steps that
    cannot act on it, else ``spec`` itself.

    transformers' GGUF loader writes SmolLM2's GPT-2-style tokenizer with ``byte_fallback`` and a
    SentencePiece decoder (ByteFallback, Fuse, Replace "▁" -> " ", then ByteLevel). Tools tell the
    two kinds of BPE apart by exactly those markers: llama.cpp's converter took it for a
    SentencePiece vocabulary and would tokenize byte-level pieces as SentencePiece ones. Dropping
    them changes neither encoding nor decoding when every token (vocabulary and added) is spelled
    in ByteLevel's 256 byte symbols and none is a "<0xNN>" byte piece: byte fallback looks for those
    pieces and, finding none, gives the unknown token as it would without it; the ByteFallback
    decoder converts only them; a Replace pattern holding a character outside the symbols cannot
    match; and ByteLevel decodes the bytes of all tokens at once, so fusing them first is a no-op
    (it is not where a token holds other characters: ByteLevel keeps those tokens verbatim)."""
    import re

    from tokenizers import pre_tokenizers

    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or not _has_byte_level(spec.get("pre_tokenizer")):
        return spec
    steps = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
    if not (model.get("byte_fallback") or len(steps) > 1):
        return spec
    if not steps or steps[-1].get("type") != "ByteLevel" or any(
            s.get("type") not in ("ByteFallback", "Fuse", "Replace") for s in steps[:-1]):
        return spec
    symbols = set(pre_tokenizers.ByteLevel.alphabet())
    patterns = [s.get("pattern", {}).get("String") for s in steps if s.get("type") == "Replace"]
    if any(p is None or set(p) <= symbols for p in patterns):
        return spec  # a regex, or a pattern the byte symbols can spell: it could match
    tokens = [*(model.get("vocab") or {}), *(t["content"] for t in spec.get("added_tokens") or [])]
    if any(not set(t) <= symbols or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in tokens):
        return spec
    return {**spec, "model": {**model, "byte_fallback": False}, "decoder": steps[-1]}


def _has_byte_level(pre_tokenizer) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])
    return pre_tokenizer.get("type") == "ByteLevel"


def save_embeddings(model, path: Path, dtype: torch.dtype) -> None:
    from safetensors.numpy import save_file

    table = model.language_model.get_input_embeddings().weight.detach().to(dtype).cpu().numpy()
    newline = model.image_newline.detach().to(dtype).cpu().numpy()
    save_file({"embed_tokens": np.ascontiguousarray(table), "image_newline": np.ascontiguousarray(newline)}, str(path))


def _import_builder():
    """onnxruntime-genai's model builder, importable beside transformers 4.x.

    The 0.18 builder imports two class names that only transformers 5 defines; it never uses them
    for Llama or Qwen2, so placeholders are enough. Importing it imports onnxruntime's
    matmul_nbits_quantizer, which calls ``logging.basicConfig(level=INFO)``: in a program that had
    not configured logging (one embedding ``ppllava.export``), every library's INFO records would
    then reach stderr. The root logger's handlers and level are put back as they were.
    """
    import transformers

    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, name):
            setattr(transformers, name, None)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import onnxruntime_genai.models  # noqa: F401  (puts the builder's modules on sys.path)
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise LLMExportError(f"onnxruntime-genai's model builder is not available ({exc}); pip install onnxruntime-genai") from None
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    return create_model, parse_extra_options


def _builder_tokenizer(hf_dir: Path, vocab_size: int, into: Path) -> None:
    """The builder insists on loading a tokenizer but only uses the config's vocab size; a checkpoint
    without one gets a placeholder in the builder's scratch copy (never shipped as the LLM's)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")
    tokenizer.save_pretrained(str(into))


def _drop_shape_annotations(path: Path) -> None:
    """The 0.18 builder's fp16 CPU graph (MultiHeadAttention with repeated KV heads) annotates a
    reshape output with the prompt length where decoding produces the total length; onnxruntime
    trusts the annotation and fails on the first decode step. Shapes are re-inferred at load, so the
    annotations can go (the weights file is untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def _fix_genai_eos(config_path: Path, hf_dir: Path) -> None:
    """The builder adds "the tokenizer's end-of-turn token" to eos_token_id; for a tokenizer config
    without token strings transformers invents one past the vocabulary (49154 of 49153 rows for
    SmolLM2), and onnxruntime-genai's own ``og.Model`` then refuses the directory. Keep the ids the
    LLM can produce, the generation config's first."""
    config = json.loads(config_path.read_text())
    model = config["model"]
    vocab = int(model["vocab_size"])
    ids = model.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    generation = hf_dir / "generation_config.json"
    wanted = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    wanted = wanted if isinstance(wanted, list) else [] if wanted is None else [wanted]
    kept = list(dict.fromkeys(int(i) for i in [*wanted, *ids] if i is not None and 0 <= int(i) < vocab))
    if not kept:
        raise LLMExportError(f"no end-of-sequence id below the vocabulary size {vocab} (builder wrote {ids})")
    if kept != ids:
        log.info("genai_config eos_token_id %s -> %s (ids must be < vocab_size %d)", ids, kept, vocab)
        model["eos_token_id"] = kept[0] if len(kept) == 1 else kept
        config_path.write_text(json.dumps(config, indent=4) + "\n")


def _last_position_logits(path: Path) -> None:
    """The builder's graph computes logits at every position, but a prefill needs only the last
    one (teacher forcing and decoding feed one token a step): a Slice on the last position before
    ``lm_head`` leaves those logits bit-identical and skips (S - 1) x hidden x vocab of the GEMM, the
    largest one in a prefill of a small LLM. ``logits`` becomes (batch, 1, vocab)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None and node.op_type == "Cast":  # an fp16 graph may cast its logits up
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):  # (a 2-D Gemm has no position axis)
        raise LLMExportError(f"{path.name}: no lm_head MatMul produces 'logits' (found {node and node.op_type})")
    hidden = node.input[0]
    sliced = f"{hidden}/last_position"
    constants = {"starts": -1, "ends": np.iinfo(np.int64).max, "axes": 1}
    for name, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{sliced}/{name}"))
    at = list(graph.node).index(node)
    graph.node.insert(at, helper.make_node("Slice", [hidden, *(f"{sliced}/{n}" for n in constants)], [sliced],
                                           name="/lm_head/last_position/Slice"))
    node.input[0] = sliced
    for output in graph.output:
        if output.name == "logits" and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].Clear()
            output.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(path))


@contextlib.contextmanager
def _logs_into(buffer: io.StringIO, names=("onnxruntime", "onnxruntime_genai")):
    """The builder's and onnxruntime's quantizer's log records go to ``buffer`` (shown only if the
    build fails) instead of the user's terminal: the 0.18 int8 build logs an error for every Gather
    it rightly leaves alone ("Gather only supports 4 bits quantization")."""
    handler = logging.StreamHandler(buffer)
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.propagate = propagate


def build_onnx_llm(hf_dir: Path, out_dir: Path, dtype: torch.dtype, precision: str | None = None) -> Path:
    """Run onnxruntime-genai's builder (CPU target, ``exclude_embeds=true``) on ``hf_dir``;
    ``precision`` ("int4", "int8") overrides the dtype's for weight-quantized CPU builds."""
    create_model, parse_extra_options = _import_builder()
    precision = precision or BUILDER_PRECISION[dtype]
    # The builder's copy of hf_dir goes beside out_dir (inside the caller's owner-named scratch),
    # never the system temp dir: same disk as the result, and swept if this run is killed.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.builder-") as scratch:
        scratch = Path(scratch)
        source = scratch / "hf"
        shutil.copytree(hf_dir, source)
        if not (source / "tokenizer.json").is_file():
            _builder_tokenizer(source, json.loads((source / "config.json").read_text())["vocab_size"], source)
        cache = scratch / "cache"
        log_buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(log_buffer), contextlib.redirect_stderr(log_buffer), _logs_into(log_buffer):
                options = parse_extra_options(None, str(source), str(out_dir), precision, "cpu", str(cache), ["exclude_embeds=true"])
                config = options["hf_details"]["hf_config"]
                if getattr(config, "rope_scaling", None) is None:
                    # transformers 4.x stores "no scaling" as None; the 0.18 builder iterates over it.
                    config.rope_scaling = {"rope_type": "default"}
                create_model(None, str(source), str(out_dir), precision, "cpu", str(cache), **options)
        except Exception as exc:  # the builder raises anything from KeyError to NotImplementedError
            tail = "\n".join(log_buffer.getvalue().strip().splitlines()[-3:])
            raise LLMExportError(f"onnxruntime-genai builder failed: {type(exc).__name__}: {exc}" + (f"\n{tail}" if tail else "")) from exc
    if not (out_dir / "model.onnx").is_file():
        raise LLMExportError(f"onnxruntime-genai builder wrote no model.onnx to {out_dir}")
    if precision != "fp32":
        _drop_shape_annotations(out_dir / "model.onnx")
    _last_position_logits(out_dir / "model.onnx")
    _fix_genai_eos(out_dir / "genai_config.json", hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        # the placeholder tokenizer (if any) stays out of the engine dir
        if not (hf_dir / name).is_file():
            (out_dir / name).unlink(missing_ok=True)
    return out_dir
