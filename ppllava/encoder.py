"""transformers' CLIP / SigLIP encoder layers, called the same way on every release we support.

transformers 4.x's ``CLIPEncoderLayer.forward(hidden_states, attention_mask, causal_attention_mask)``
returns a tuple; 5.x's takes one mask (any causal part folded in) and returns the tensor. SigLIP's
layer already had the 5.x form in 4.57. Rather than branching at every call site, the towers run
their layers through ``run_layer``, with one additive float mask (or None); on 4.x the causal-mask
argument is passed as None, which makes ``CLIPAttention`` use ``attention_mask`` as it is.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

# Read once, at import: a signature check inside a traced forward is needless work for the tracer.
_CLIP_TAKES_CAUSAL_MASK = "causal_attention_mask" in inspect.signature(CLIPEncoderLayer.forward).parameters


def run_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One encoder layer: (B, S, C) hidden states and a (B, 1, S, S) additive mask -> (B, S, C)."""
    if _CLIP_TAKES_CAUSAL_MASK and isinstance(layer, CLIPEncoderLayer):
        out = layer(hidden, attention_mask, None)
    else:
        out = layer(hidden, attention_mask)
    return out[0] if isinstance(out, tuple) else out
