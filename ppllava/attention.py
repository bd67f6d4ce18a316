"""The attention arithmetic upstream's released checkpoints were computed with, where it matters.

Upstream builds its BT-Adapter blocks and its CLIP alignment text tower from transformers' eager
``CLIPAttention`` of the time, which scales the queries *before* the QK product. Today's eager
path scales after it. The results differ by rounding only (~1e-7), but prompt-guided pooling
amplifies such differences (a temperature-0.01 softmax over a relevance softmax with logit scale
100), so we keep upstream's order for those modules. Registered once, on first use, under
``PRESCALED_EAGER``.
"""

from __future__ import annotations

import torch
from torch import nn

PRESCALED_EAGER = "ppllava_prescaled_eager"


def prescaled_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """(B, H, L, d) query/key/value -> (B, L, H, d) output, as transformers' attention functions return."""
    weights = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def register_prescaled_eager() -> str:
    from transformers import AttentionInterface

    if PRESCALED_EAGER not in AttentionInterface._global_mapping:
        AttentionInterface.register(PRESCALED_EAGER, prescaled_eager_attention)
    return PRESCALED_EAGER


def with_attention(config, implementation: str):
    """A shallow copy of a transformers config that runs ``implementation`` attention."""
    import copy

    config = copy.copy(config)
    config._attn_implementation = implementation
    return config
