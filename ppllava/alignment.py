"""The alignment text tower with the extended position table (stage 2's PPLLaVA-specific part)."""

from __future__ import annotations

import torch
from torch import nn

from ppllava.alignment_config import KEEP, PRESETS, AlignmentConfig, extended_length, resolve_alignment_config
from ppllava.attention import register_prescaled_eager

__all__ = [
    "KEEP", "PRESETS", "AlignmentConfig", "ExtendedTextEmbeddings", "build_text_tower", "extend_position_table",
    "extended_length", "resolve_alignment_config",
]


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
        length = inputs_embeds.shape[1]  # PPLLaVA.text_embedding checks it fits the table
        # A row-wise select (not arithmetic) keeps this exact and free of length-dependent branches,
        # so one exported graph serves every text length.
        first = (torch.arange(length, device=inputs_embeds.device) < KEEP)[:, None]
        positions = torch.where(first, self.position_embedding[:length], self.position_embedding_res[:length])
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
