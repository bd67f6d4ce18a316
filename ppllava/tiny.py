"""Deterministic random checkpoints in the upstream layout, for tests and demos.

Sizes follow ``../shared/formats`` (42 px images, 7 px patches -> 6x6 grid, 4-layer ViT of width
32, 2-layer LLM of width 64, vocab 1024, image token 1000). Weights are random but drawn from a
portable seeded generator (``ppllava.seeded``), so the same seed gives the same bytes on every CPU
and under every ATen kernel set; tests/test_checkpoint.py checks the SHA-256 under each.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ppllava.seeded import Seeded

VICUNA_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaInterleaveForConditionalGeneration"],
    "model_type": "llava_next",
    "qwen": False,
    "btadapter": True,
    "btadapter_depth": 2,
    "max_T": 8,
    "clip_post_pretrain": None,
    "clip_weight": "clip_tiny",
    "extend_clip": True,
    "frame_shape": [6, 6],
    "image_pooling_kernel": [1, 3, 3],
    "image_pooling_stride": [1, 3, 3],
    "image_token_index": 1000,
    "pad_token_id": 0,
    "pllava_pooling_shape": None,
    "pooling": "ppllava",
    "pooling_kernel": [2, 3, 3],
    "pooling_stride": [2, 3, 3],
    "pooling_temp": 0.01,
    "projector_hidden_act": "gelu",
    "text_config": {
        "model_type": "llama", "head_dim": 16, "hidden_size": 64, "intermediate_size": 128,
        "max_position_embeddings": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "pad_token_id": 0, "rms_norm_eps": 1e-05, "vocab_size": 1024,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "valuew_plus": False,
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 32, "image_size": 42, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 4, "patch_size": 7, "projection_dim": 16,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}

VICUNA_ALIGNMENT: dict[str, Any] = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 16,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2, "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 16,
        "vocab_size": 49408, "max_position_embeddings": 77,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 32, "image_size": 42, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 1, "patch_size": 7, "projection_dim": 16,
    },
}

QWEN_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaInterleaveForConditionalGeneration"],
    "model_type": "llava_onevision",
    "qwen": True,
    "btadapter": False,
    "btadapter_depth": 4,
    "max_T": 64,
    "clip_post_pretrain": None,
    "clip_weight": "siglip_tiny",
    "extend_clip": True,
    "frame_shape": [6, 6],
    "image_pooling_kernel": [1, 3, 3],
    "image_pooling_stride": [1, 3, 3],
    "image_token_index": 1000,
    "pad_token_id": 151643,
    "pllava_pooling_shape": None,
    "pooling": "ppllava",
    "pooling_kernel": [2, 3, 3],
    "pooling_stride": [2, 3, 3],
    "pooling_temp": 0.01,
    "projector_hidden_act": "gelu",
    "text_config": {
        "model_type": "qwen2", "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 64,
        "intermediate_size": 128, "max_position_embeddings": 256, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": 1024,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "valuew_plus": False,
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 32, "image_size": 42, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 4, "patch_size": 7, "vision_use_head": False,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
}

QWEN_ALIGNMENT: dict[str, Any] = {
    "architectures": ["SiglipModel"],
    "model_type": "siglip",
    "text_config": {
        "model_type": "siglip_text_model", "eos_token_id": 1, "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 64,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 32, "image_size": 42, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 1, "patch_size": 7,
    },
}

TINY = {"vicuna": (VICUNA_CONFIG, VICUNA_ALIGNMENT), "qwen": (QWEN_CONFIG, QWEN_ALIGNMENT)}


def tiny_configs(variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fresh copies of the tiny (config.json, alignment config.json) for ``variant``."""
    if variant not in TINY:
        raise ValueError(f"variant must be one of {sorted(TINY)}, got {variant!r}")
    config, alignment = TINY[variant]
    return copy.deepcopy(config), copy.deepcopy(alignment)


def random_state_dict(config: dict[str, Any], alignment: dict[str, Any], seed: int, skip: tuple[str, ...] = (),
                      dtype=None, device=None) -> dict:
    """Seeded random weights with the shapes the config implies, in upstream key names (keys
    starting with a ``skip`` prefix are left out, for weights that come from elsewhere), on the CPU.

    ``device`` (e.g. ``"cuda"``): draw with torch's generator on that device instead of the portable
    one. numpy's scalar sampler takes ~10 minutes for a 7B model; a GPU takes a second. Those values
    depend on the device and its kernels (``ppllava.seeded`` says why), so use it where only shapes
    matter (timing), never for anything compared across machines."""
    import torch

    from ppllava.alignment import AlignmentConfig, extend_position_table
    from ppllava.config import PPLLaVAConfig
    from ppllava.model import PPLLaVA

    cfg = PPLLaVAConfig.from_dict(config)
    alignment_config = AlignmentConfig.from_dict(alignment, "tiny alignment config")
    model = PPLLaVA.build_empty(cfg, alignment_config)
    tied = bool(model.language_model.config.tie_word_embeddings)
    if device is None:
        gen = Seeded(seed)

        def randn(*shape, std=1.0, mean=0.0, dtype=np.float32):
            return torch.from_numpy(gen.normal(*shape, std=std, mean=mean, dtype=dtype))
    else:
        drawn = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, std=1.0, mean=0.0, dtype=np.float32):  # left on the device until cast
            kind = torch.float64 if dtype == np.float64 else torch.float32
            return torch.randn(shape, generator=drawn, dtype=kind, device=device).mul_(std).add_(mean)

    norm_params = {
        f"{mod_name}.{p}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")
        for p in ("weight", "bias")
    }
    state = {}
    for name, param in sorted(model.state_dict(keep_vars=True).items()):
        if (tied and name == "language_model.lm_head.weight") or name.startswith(skip):
            continue
        shape = tuple(param.shape)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("position_embedding") or name.endswith("position_embedding_res"):
            continue  # filled below from one original-length table
        if name in norm_params:
            value = randn(*shape, std=0.1, mean=1.0) if leaf == "weight" else randn(*shape, std=0.05)
        elif name.endswith("logit_scale"):
            value = torch.full(shape, math.log(100.0))  # CLIP's trained temperature: a peaky relevance softmax
        elif name.endswith("logit_bias"):
            value = torch.full(shape, -10.0)
        elif leaf == "bias" or name.endswith("in_proj_bias"):
            value = randn(*shape, std=0.02)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = randn(*shape, std=1.0 / math.sqrt(fan_in))
        else:
            value = randn(*shape, std=0.5)
        state[name] = (value if dtype is None else value.to(dtype)).contiguous().cpu()  # cast before the copy
    # The extended position table: a random original-length table stretched as upstream does, then a
    # "trained" residual copy that differs from it (both are stored, both are read). Stretched and
    # summed in float64 (elementwise IEEE operations, the same on every CPU), then rounded once.
    width = int(alignment["text_config"]["hidden_size"])
    table = extend_position_table(randn(alignment_config.original_positions, width, std=0.1, dtype=np.float64).cpu())
    residual = table + randn(*table.shape, std=0.02, dtype=np.float64).cpu()
    prefix = "multi_modal_projector.clip_text_model.embeddings."
    for name, value in ((prefix + "position_embedding", table), (prefix + "position_embedding_res", residual)):
        value = value.to(torch.float32)
        state[name] = (value if dtype is None else value.to(dtype)).contiguous()
    return state


def tiny_tokenizer(vocab_size: int, specials: dict[int, str], eos: str | None = None):
    """A byte-level tokenizer with a fixed layout for the tiny checkpoints: ``specials`` at their ids,
    the 256 byte symbols from id 3, unused fillers elsewhere (no merges: one token per byte).
    ``eos`` is appended to every encoding (the SigLIP convention)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab, next_byte = {}, iter(sorted(alphabet))
    for i in range(vocab_size):
        if i in specials:
            vocab[specials[i]] = i
        elif 3 <= i < 3 + len(alphabet):
            vocab[next(next_byte)] = i
        else:
            vocab[f"<unused_{i}>"] = i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials.get(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    if eos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=specials.get(0), eos_token=specials.get(2),
                                   bos_token=specials.get(1), pad_token=specials.get(0))


def write_tiny_tokenizers(out: Path, config: dict[str, Any], alignment: dict[str, Any]) -> None:
    """LLM tokenizer (with the image token and, for chatml, its role tokens) and, for SigLIP, the
    alignment tokenizer in the alignment model's directory. CLIP's real BPE needs no file here:
    export rebuilds it from open_clip's vocabulary."""
    vocab = int(config["text_config"]["vocab_size"])
    specials = {0: "<unk>", 1: "<s>", 2: "</s>", int(config["image_token_index"]): "<image>"}
    if config["model_type"] == "llava_onevision":
        specials.update({vocab - 2: "<|im_start|>", vocab - 1: "<|im_end|>"})
    tiny_tokenizer(vocab, specials).save_pretrained(str(out))
    if alignment["model_type"] == "siglip":
        align_vocab = int(alignment["text_config"].get("vocab_size", 32000))
        tiny_tokenizer(align_vocab, {0: "<unk>", 1: "<pad>", 2: "</s>"}, eos="</s>").save_pretrained(
            str(out / str(config["clip_weight"]))
        )


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    alignment: dict[str, Any],
    seed: int = 0,
    shards: int = 1,
    weights_format: str = "safetensors",
    state: dict | None = None,
) -> Path:
    """Write config.json, the alignment config directory and the weights in the upstream layout."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = random_state_dict(config, alignment, seed)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    clip_dir = out / str(config["clip_weight"])
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / "config.json").write_text(json.dumps(alignment, indent=2) + "\n")
    names = sorted(state)
    if weights_format == "bin":
        torch.save(state, out / "pytorch_model.bin")
    elif shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per : (i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def make_tiny(out_dir: str | Path, variant: str = "vicuna", seed: int = 0, llm: str | None = None, **overrides) -> Path:
    """A deterministic tiny checkpoint of ``variant`` at ``out_dir``; top-level config keys may be
    overridden. ``llm="smollm2"`` puts the real SmolLM2-135M-Instruct in place of the random LLM."""
    config, alignment = tiny_configs(variant)
    config.update(overrides)
    if llm is None:
        out = write_checkpoint(out_dir, config, alignment, seed)
        write_tiny_tokenizers(out, config, alignment)
        return out
    if llm != "smollm2":
        raise ValueError(f"llm must be None or 'smollm2', got {llm!r}")
    from ppllava.smollm import smollm2_checkpoint_parts

    text_config, llm_state, tokenizer = smollm2_checkpoint_parts()
    config.update(text_config=text_config, image_token_index=text_config["vocab_size"] - 1, pad_token_id=0, max_T=32)
    config.update(overrides)
    state = random_state_dict(config, alignment, seed, skip=("language_model.",))
    state.update({f"language_model.{k}": v for k, v in llm_state.items()})
    out = write_checkpoint(out_dir, config, alignment, seed, state=state)
    tokenizer.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": text_config["eos_token_id"],
                                                            "bos_token_id": text_config["bos_token_id"]}) + "\n")
    return out
