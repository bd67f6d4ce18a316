"""The alignment model's hyper-parameters and its text tower with the extended position table.

The alignment *weights* always come from the PPLLaVA checkpoint (upstream re-initialises the token
embedding when it extends the context, so OpenAI's weights would change the model). Only the
hyper-parameters come from the ``clip_weight`` directory's config.json, or from built-in presets
of the two public ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppllava.attention import register_prescaled_eager
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


def extend_position_table(table: torch.Tensor) -> torch.Tensor:
    """Upstream's ``convert_text_position``: stretch an (n, d) position table to 4n - 60 rows.

    Rows < 20 are copied; each later gap is linearly interpolated in quarters; the last four rows
    extrapolate from the final step.
    """
    n, d = table.shape
    if n <= KEEP + 1:
        raise ValueError(f"position table needs more than {KEEP + 1} rows, got {n}")
    out = torch.zeros(extended_length(n), d, dtype=table.dtype)
    out[:KEEP] = table[:KEEP]
    for i in range(n - 1 - KEEP):
        a, b = table[KEEP + i], table[KEEP + i + 1]
        out[KEEP + 4 * i] = a
        out[KEEP + 4 * i + 1] = 3 * a / 4 + 1 * b / 4
        out[KEEP + 4 * i + 2] = 2 * a / 4 + 2 * b / 4
        out[KEEP + 4 * i + 3] = 1 * a / 4 + 3 * b / 4
    last, step = table[n - 1], table[n - 1] - table[n - 2]
    for k in range(4):
        out[extended_length(n) - 4 + k] = last + k * step / 4
    return out


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
    def positions(self) -> int:
        return extended_length(int(self.text.get("max_position_embeddings", 77 if self.kind == "clip" else 64)))

    def hf_text_config(self):
        from transformers import CLIPTextConfig, SiglipTextConfig

        cls = CLIPTextConfig if self.kind == "clip" else SiglipTextConfig
        return cls(**{k: v for k, v in self.text.items() if k != "model_type"})

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "AlignmentConfig":
        kind = raw.get("model_type")
        if kind not in ("clip", "siglip"):
            raise ConfigError(f"{source}: model_type must be 'clip' or 'siglip', got {kind!r}")
        text = dict(raw.get("text_config") or {})
        vision = dict(raw.get("vision_config") or {})
        defaults_eps = 1e-5 if kind == "clip" else 1e-6
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
            if not isinstance(text.get(key), int):
                raise ConfigError(f"{source}: text_config.{key} is missing")
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
    elif clip_weight:
        candidates = [checkpoint_dir / clip_weight / "config.json", Path(clip_weight) / "config.json"]
    for path in candidates:
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from None
            config = AlignmentConfig.from_dict(raw, str(path))
            break
    else:
        if clip_weight in PRESETS:
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


class ExtendedTextEmbeddings(nn.Module):
    """Token embedding plus the extended position table (upstream's ``ExtendTextEmbeddings``).

    Positions < 20 read ``position_embedding``, positions >= 20 read ``position_embedding_res``;
    both are stored in the checkpoint and differ after training.
    """

    def __init__(self, vocab_size: int, width: int, positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(positions, width))
        self.position_embedding_res = nn.Parameter(torch.zeros(positions, width))

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        # position_ids is accepted for the transformers text-transformer signature and ignored, as
        # upstream does: positions are always 0..L-1.
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        length = inputs_embeds.shape[1]
        if length > self.position_embedding.shape[0]:
            raise ValueError(
                f"alignment text has {length} tokens; the extended position table holds "
                f"{self.position_embedding.shape[0]}"
            )
        positions = torch.cat(
            [self.position_embedding[: min(length, KEEP)], self.position_embedding_res[KEEP:length]], dim=0
        )
        return inputs_embeds + positions.to(inputs_embeds.dtype)


def build_text_tower(config: AlignmentConfig, attn_implementation: str) -> nn.Module:
    """transformers' CLIP/SigLIP text transformer with the extended embeddings swapped in."""
    from transformers.models.clip.modeling_clip import CLIPTextTransformer
    from transformers.models.siglip.modeling_siglip import SiglipTextTransformer

    hf_config = config.hf_text_config()
    # Upstream builds the CLIP text tower directly (not through from_pretrained), which gave it the
    # eager attention of its transformers release; SigLIP's got SDPA. See ppllava/attention.py.
    hf_config._attn_implementation = register_prescaled_eager() if config.kind == "clip" else attn_implementation
    tower = (CLIPTextTransformer if config.kind == "clip" else SiglipTextTransformer)(hf_config)
    tower.embeddings = ExtendedTextEmbeddings(hf_config.vocab_size, hf_config.hidden_size, config.positions)
    return tower
