"""The alignment text tower with the extended position table (stage 2's PPLLaVA-specific part)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ppllava.alignment_config import KEEP, PRESETS, AlignmentConfig, extended_length, resolve_alignment_config
from ppllava.attention import register_prescaled_eager
from ppllava.encoder import run_layer

__all__ = [
    "KEEP", "PRESETS", "AlignmentConfig", "AlignmentTextTower", "ExtendedTextEmbeddings", "build_text_tower",
    "extend_position_table", "extended_length", "resolve_alignment_config",
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


class AlignmentTextTower(nn.Module):
    """The CLIP / SigLIP text transformer as upstream ran it (transformers 4.x's
    ``CLIPTextTransformer`` / ``SiglipTextTransformer``): extended embeddings, transformers' encoder,
    final LayerNorm, then the pooled token (CLIP: the end-of-text token; SigLIP: the last position,
    through ``head``). Parameter names are those classes', so upstream checkpoints load as they are.

    Assembled here because transformers 5 folded those classes into ``PreTrainedModel``s whose mask
    builder returns no mask at all for a custom attention function such as ours: CLIP's tower would
    silently run without its causal mask. The masks are built as 4.x built them: additive float,
    causal (CLIP) plus padding where ``attention_mask`` is 0.
    """

    def __init__(self, hf_config, kind: str, positions: int):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoder
        from transformers.models.siglip.modeling_siglip import SiglipEncoder

        self.config = hf_config
        self.kind = kind
        self.embeddings = ExtendedTextEmbeddings(hf_config.vocab_size, hf_config.hidden_size, positions)
        self.encoder = (CLIPEncoder if kind == "clip" else SiglipEncoder)(hf_config)
        self.final_layer_norm = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_eps)
        if kind == "siglip":
            self.head = nn.Linear(hf_config.hidden_size, hf_config.projection_size)
        self.eos_token_id = hf_config.eos_token_id

    def mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, L, L) additive mask, finfo.min where a query may not look; None when nothing is hidden."""
        B, L = hidden.shape[:2]
        low = torch.finfo(hidden.dtype).min
        mask = None
        if self.kind == "clip":
            positions = torch.arange(L, device=hidden.device)
            later = positions[None, :] > positions[:, None]  # (L, L): key after query
            mask = torch.zeros(L, L, dtype=hidden.dtype, device=hidden.device).masked_fill(later, low)[None, None]
        if attention_mask is not None:
            padding = (attention_mask == 0)[:, None, None, :]  # (B, 1, 1, L)
            pad = torch.zeros(B, 1, L, L, dtype=hidden.dtype, device=hidden.device).masked_fill(padding, low)
            mask = pad if mask is None else pad + mask  # summed as 4.x's CLIPAttention sums them
        return mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> BaseModelOutputWithPooling:
        """(B, L) ids and optional (B, L) 0/1 mask -> last hidden state (B, L, C) and pooled (B, C')."""
        hidden = self.embeddings(input_ids=input_ids)  # (B, L, C)
        mask = self.mask(hidden, attention_mask)
        for layer in self.encoder.layers:
            hidden = run_layer(layer, hidden, mask)
        hidden = self.final_layer_norm(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.kind == "siglip":
            pooled = self.head(hidden[:, -1, :])  # SigLIP tokenizes with a trailing end-of-text
        elif self.eos_token_id == 2:
            # CLIP configs from before transformers PR #24773 carry eos 2: the end-of-text token is the
            # highest id in the sequence (int32 argmax, as transformers does for ONNX's opset 14)
            pooled = hidden[rows, input_ids.to(dtype=torch.int, device=hidden.device).argmax(dim=-1)]
        else:
            pooled = hidden[rows, (input_ids.to(dtype=torch.int, device=hidden.device) == self.eos_token_id)
                            .int().argmax(dim=-1)]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def build_text_tower(config: AlignmentConfig, attn_implementation: str) -> nn.Module:
    """The alignment text tower with the extended embeddings."""
    hf_config = config.hf_text_config()
    # Upstream builds the CLIP text tower directly (not through from_pretrained), which gave it the
    # eager attention of its transformers release; SigLIP's got SDPA. See ppllava/attention.py.
    hf_config._attn_implementation = register_prescaled_eager() if config.kind == "clip" else attn_implementation
    return AlignmentTextTower(hf_config, config.kind, config.positions)
