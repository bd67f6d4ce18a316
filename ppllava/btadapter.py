"""BT-Adapter: a temporal branch beside the last ViT layers that mixes information across frames.

Written from PPLLAVA.md (stage 1). The adapter state x2 is one sequence per clip,
``[CLS, N·T patch tokens]`` laid out patch-major, time-minor. Attention and MLP blocks are
transformers' CLIP modules (attention with upstream's arithmetic order, see ``attention.py``);
the LayerNorms use PyTorch's default eps as upstream does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP

from ppllava.attention import register_prescaled_eager, with_attention


def patches_to_clip(x: torch.Tensor, T: int) -> torch.Tensor:
    """(T, N, C) per-frame patches -> (1, N*T, C), patch-major / time-minor."""
    return x.transpose(0, 1).reshape(1, -1, x.shape[-1])


def clip_to_patches(x: torch.Tensor, T: int) -> torch.Tensor:
    """(1, N*T, C) patch-major / time-minor -> (T, N, C) per frame."""
    return x.reshape(-1, T, x.shape[-1]).transpose(0, 1)


class TemporalBlock(nn.Module):
    """Attention over the T time steps of each patch; CLS passes through; no MLP."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(with_attention(config, register_prescaled_eager()))
        self.layer_norm1 = nn.LayerNorm(config.hidden_size)
        self.temporal_fc = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]  # (1, 1, C), (1, N*T, C)
        C = x.shape[-1]
        h = patches.reshape(-1, T, C)  # (N, T, C): one sequence per patch
        h = self.self_attn(hidden_states=self.layer_norm1(h))[0]
        h = self.temporal_fc(h).reshape(1, -1, C)
        return torch.cat([cls, patches + h], dim=1)


class SpatialBlock(nn.Module):
    """Attention within each frame over [CLS, N patches]; CLS outputs averaged over frames; MLP."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(with_attention(config, register_prescaled_eager()))
        self.layer_norm1 = nn.LayerNorm(config.hidden_size)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        C = x.shape[-1]
        cls = x[:, :1].expand(T, 1, C)  # (T, 1, C): the clip CLS repeated per frame
        frames = clip_to_patches(x[:, 1:], T)  # (T, N, C)
        h = torch.cat([cls, frames], dim=1)
        h = self.self_attn(hidden_states=self.layer_norm1(h))[0]  # (T, 1+N, C)
        cls_out = h[:, :1].mean(dim=0, keepdim=True)  # (1, 1, C)
        h = x + torch.cat([cls_out, patches_to_clip(h[:, 1:], T)], dim=1)
        return h + self.mlp(self.layer_norm2(h))


class BTAdapterMixin:
    """Adapter state handling shared by the CLIP tower (needs ``embeddings``, the block lists,
    ``btadapter_time_embed`` and ``btadapter_cls_token``)."""

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """Block 0 input ("input_ini") from the ViT state x (T, 1+N, C)."""
        T = x.shape[0]
        pos = self.embeddings.position_embedding.weight  # (1+N, C)
        cls_vit = x[:, :1].mean(dim=0, keepdim=True)  # (1, 1, C)
        patches = x[:, 1:] + pos[1:]  # spatial position added again, as upstream does
        patches = patches + self.btadapter_time_embed.weight[:T, None, :]  # (T, N, C)
        cls = (cls_vit + (self.btadapter_cls_token + pos[:1])) / 2
        return torch.cat([cls, patches_to_clip(patches, T)], dim=1)

    def adapter_step(self, k: int, x: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        """Run adapter block k after ViT layer (L - depth + k); x: (T, 1+N, C) ViT state."""
        T = x.shape[0]
        if x2 is None:
            h = self.adapter_input(x)
        else:
            cls_vit = x[:, :1].mean(dim=0, keepdim=True)
            h = x2 + torch.cat([cls_vit, patches_to_clip(x[:, 1:], T)], dim=1)
        h = self.btadapter_T_layers[k](h, T)
        return self.btadapter_S_layers[k](h, T)

    @staticmethod
    def combine(x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Hidden state once the adapter runs: [ViT CLS, (ViT patches + adapter patches) / 2] per frame."""
        T = x.shape[0]
        return torch.cat([x[:, :1], (x[:, 1:] + clip_to_patches(x2[:, 1:], T)) / 2], dim=1)
