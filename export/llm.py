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


def extract_hf_llm(model, out_dir: Path, tokenizer_dir: Path | None, dtype: torch.dtype) -> Path:
    """Save the LLM as a plain transformers directory (config, safetensors, generation config, tokenizer)."""
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
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out_dir / name)
    return out_dir


def save_embeddings(model, path: Path, dtype: torch.dtype) -> None:
    from safetensors.numpy import save_file

    table = model.language_model.get_input_embeddings().weight.detach().to(dtype).cpu().numpy()
    newline = model.image_newline.detach().to(dtype).cpu().numpy()
    save_file({"embed_tokens": np.ascontiguousarray(table), "image_newline": np.ascontiguousarray(newline)}, str(path))


def _import_builder():
    """onnxruntime-genai's model builder, importable beside transformers 4.x.

    The 0.18 builder imports two class names that only transformers 5 defines; it never uses them
    for Llama or Qwen2, so placeholders are enough.
    """
    import transformers

    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, name):
            setattr(transformers, name, None)
    try:
        import onnxruntime_genai.models  # noqa: F401  (puts the builder's modules on sys.path)
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise LLMExportError(f"onnxruntime-genai's model builder is not available ({exc}); pip install onnxruntime-genai") from None
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
            with contextlib.redirect_stdout(log_buffer), contextlib.redirect_stderr(log_buffer):
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
    _fix_genai_eos(out_dir / "genai_config.json", hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        # the placeholder tokenizer (if any) stays out of the engine dir
        if not (hf_dir / name).is_file():
            (out_dir / name).unlink(missing_ok=True)
    return out_dir
