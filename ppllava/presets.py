"""Random-weight checkpoints at real shapes, so latency can be measured before downloading weights.

Timings do not depend on weight values. ``small`` is sized for a CPU run of a couple of minutes;
``vicuna-7b`` and ``qwen2-7b`` have the released models' shapes (building them needs ~16 GB of RAM
for fp16 weights plus the export's working memory).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ppllava.tiny import QWEN_ALIGNMENT, QWEN_CONFIG, VICUNA_ALIGNMENT, VICUNA_CONFIG, tiny_tokenizer

_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
               "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                  "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": False}

PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "base": "vicuna",
        "config": {
            "btadapter_depth": 2, "max_T": 32, "frame_shape": [16, 16], "image_token_index": 32000,
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 384, "image_size": 224,
                              "intermediate_size": 1536, "num_attention_heads": 6, "num_hidden_layers": 8,
                              "patch_size": 14},
            "text_config": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408,
                            "num_attention_heads": 8, "num_key_value_heads": 8, "num_hidden_layers": 8,
                            "vocab_size": 32064, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
        },
        "alignment": {"projection_dim": 256, "text_config": {"model_type": "clip_text_model", "hidden_size": 256,
                      "intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 4,
                      "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 2}},
    },
    "vicuna-7b": {
        "base": "vicuna",
        "config": {
            "btadapter_depth": 4, "max_T": 64, "frame_shape": [24, 24], "image_token_index": 32000,
            "vision_config": _CLIP_L_336,
            "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
                            "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        },
        "alignment": {"projection_dim": 768, "text_config": {"model_type": "clip_text_model", "hidden_size": 768,
                      "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                      "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 2}},
        "dtype": "float16",
    },
    "qwen2-7b": {
        "base": "qwen",
        "config": {
            "frame_shape": [27, 27], "image_token_index": 151646, "vision_config": _SIGLIP_SO400M,
            "text_config": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                            "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
                            "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                            "bos_token_id": 151643, "eos_token_id": 151645},
        },
        "alignment": {"text_config": {"model_type": "siglip_text_model", "hidden_size": 1152,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "vocab_size": 32000, "max_position_embeddings": 64}},
        "dtype": "float16",
    },
}


def build_random_checkpoint(preset: str, out: Path, seed: int = 0, device=None) -> Path:
    """Write a random-weight checkpoint (with tokenizers) at the preset's shapes. ``device``: where
    the weights are drawn (``random_state_dict``; default the portable CPU generator)."""
    import torch

    from ppllava.tiny import random_state_dict, write_checkpoint

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    spec = PRESETS[preset]
    base_config, base_alignment = (VICUNA_CONFIG, VICUNA_ALIGNMENT) if spec["base"] == "vicuna" else (QWEN_CONFIG, QWEN_ALIGNMENT)
    config, alignment = copy.deepcopy(base_config), copy.deepcopy(base_alignment)
    config.update(copy.deepcopy(spec["config"]))
    alignment.update({k: v for k, v in spec["alignment"].items() if k != "text_config"})
    alignment["text_config"] = copy.deepcopy(spec["alignment"]["text_config"])
    alignment["vision_config"] = dict(config["vision_config"])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    state = random_state_dict(config, alignment, seed, dtype=dtype, device=device)  # converted tensor by tensor
    write_checkpoint(out, config, alignment, seed, state=state)
    vocab = int(config["text_config"]["vocab_size"])
    eos = int(config["text_config"].get("eos_token_id", 2))
    specials = {0: "<unk>", 1: "<s>", eos: "</s>", int(config["image_token_index"]): "<image>"}
    tiny_tokenizer(vocab, specials).save_pretrained(str(out))
    if alignment["model_type"] == "siglip":
        tiny_tokenizer(int(alignment["text_config"]["vocab_size"]), {0: "<unk>", 1: "<pad>", 2: "</s>"}, eos="</s>"
                       ).save_pretrained(str(out / str(config["clip_weight"])))
    return out
