"""The alignment model's hyper-parameters (torch-free, so ``ppllava info`` runs without torch).

The alignment *weights* always come from the PPLLaVA checkpoint (upstream re-initialises the token
embedding when it extends the context, so OpenAI's weights would change the model). Only the
hyper-parameters come from the ``clip_weight`` directory's config.json, or from built-in presets
of the two public ids, or from an explicit ``--alignment-config``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppllava.errors import ConfigError

log = logging.getLogger(__name__)

KEEP = 20  # rows of the original table kept as they are (upstream's keep_len)

# config.json hyper-parameters of the two public alignment models (only what the tower needs).
PRESETS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {
            "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1,
        },
        "vision_config": {"hidden_size": 1024, "layer_norm_eps": 1e-5},
    },
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip",
        "text_config": {
            "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
            "num_hidden_layers": 27, "max_position_embeddings": 64, "vocab_size": 32000,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
        "vision_config": {"hidden_size": 1152, "layer_norm_eps": 1e-6},
    },
}


def extended_length(original: int) -> int:
    """Rows of the extended table: 77 -> 248 (CLIP), 64 -> 196 (SigLIP)."""
    return 4 * original - 3 * KEEP


@dataclass
class AlignmentConfig:
    """Hyper-parameters of the alignment model (CLIP or SigLIP) that PPLLaVA embeds."""

    kind: str  # "clip" | "siglip"
    text: dict[str, Any]
    vision_hidden_size: int
    vision_layer_norm_eps: float
    projection_dim: int | None
    source: str

    @property
    def original_positions(self) -> int:
        """Rows of the alignment model's own position table (transformers' defaults: CLIP 77, SigLIP 64)."""
        return int(self.text.get("max_position_embeddings", 77 if self.kind == "clip" else 64))

    @property
    def positions(self) -> int:
        """Rows of the extended table PPLLaVA stores: 248 (CLIP) or 196 (SigLIP)."""
        return extended_length(self.original_positions)

    def hf_text_config(self):
        from transformers import CLIPTextConfig, SiglipTextConfig

        cls = CLIPTextConfig if self.kind == "clip" else SiglipTextConfig
        return cls(**{k: v for k, v in self.text.items() if k != "model_type"})

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "AlignmentConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: must hold a JSON object")
        kind = raw.get("model_type")
        if kind not in ("clip", "siglip"):
            raise ConfigError(f"{source}: model_type must be 'clip' or 'siglip', got {kind!r}")
        text, vision = raw.get("text_config") or {}, raw.get("vision_config") or {}
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ConfigError(f"{source}: text_config and vision_config must be JSON objects")
        text, vision = dict(text), dict(vision)
        defaults_eps = 1e-5 if kind == "clip" else 1e-6
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
            if not isinstance(text.get(key), int) or text[key] <= 0:
                raise ConfigError(f"{source}: text_config.{key} must be a positive integer, got {text.get(key)!r}")
        if text["hidden_size"] % text["num_attention_heads"]:
            raise ConfigError(
                f"{source}: text hidden_size {text['hidden_size']} is not divisible by "
                f"num_attention_heads {text['num_attention_heads']}"
            )
        projection_dim = raw.get("projection_dim", text.get("projection_dim")) if kind == "clip" else None
        if kind == "clip" and not isinstance(projection_dim, int):
            raise ConfigError(f"{source}: projection_dim is missing")
        return cls(
            kind=kind,
            text=text,
            vision_hidden_size=int(vision.get("hidden_size", 0)),
            vision_layer_norm_eps=float(vision.get("layer_norm_eps", defaults_eps)),
            projection_dim=projection_dim,
            source=source,
        )


def resolve_alignment_config(
    checkpoint_dir: Path, clip_weight: str | None, variant: str, override: str | Path | None = None
) -> AlignmentConfig:
    """Find the alignment hyper-parameters: explicit override, then ``clip_weight`` relative to the
    checkpoint, then an absolute ``clip_weight`` path, then the built-in presets."""
    want = "clip" if variant == "vicuna" else "siglip"
    candidates: list[Path] = []
    if override is not None:
        p = Path(override)
        candidates = [p if p.suffix == ".json" else p / "config.json"]
        if not candidates[0].is_file():
            raise ConfigError(f"alignment config {candidates[0]} does not exist")
    elif isinstance(clip_weight, str) and clip_weight:
        candidates = [checkpoint_dir / clip_weight / "config.json", Path(clip_weight) / "config.json"]
    for path in candidates:
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from None
            config = AlignmentConfig.from_dict(raw, str(path))
            break
    else:
        if isinstance(clip_weight, str) and clip_weight in PRESETS:
            log.info("alignment hyper-parameters: built-in preset for %s", clip_weight)
            config = AlignmentConfig.from_dict(PRESETS[clip_weight], f"preset {clip_weight}")
        else:
            raise ConfigError(
                f"cannot find the alignment model's config.json (clip_weight={clip_weight!r} is neither a "
                f"directory next to the checkpoint nor one of {', '.join(PRESETS)}); pass "
                "--alignment-config PATH (alignment_config= in Python) pointing at its config.json"
            )
    if config.kind != want:
        raise ConfigError(f"{config.source}: the {variant} variant needs a {want} alignment model, got {config.kind}")
    return config
