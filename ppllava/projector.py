"""Stages 2 and 3: the question's alignment embedding and prompt-guided pooling.

Parameter names follow upstream's ``multi_modal_projector.*`` layout: the LLaVA projector
(``linear_1``, ``linear_2``) plus the alignment model's text tower, visual LayerNorm and projection
(CLIP) or patch head (SigLIP), and its logit scale (and bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.siglip.modeling_siglip import SiglipMLP

from ppllava.alignment import AlignmentConfig, build_text_tower
from ppllava.plan import WindowPlan
from ppllava.pooling import weighted_window_pool


class _InProjAttention(nn.Module):
    """Parameter holder matching upstream's packed multi-head attention (in_proj + out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)  # stored; unused since the probe output is discarded


class SiglipPatchHead(nn.Module):
    """SigLIP's attention-pooling head applied per patch (upstream ``SiglipPoolingHead_PatchCLS``).

    Each token's embedding is its value projection plus the head MLP on its LayerNorm; the probe
    attention's output is discarded. Its attention weights only matter with ``valuew_plus``.
    """

    def __init__(self, vision_config):
        super().__init__()
        width = vision_config.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = _InProjAttention(width, vision_config.num_attention_heads)
        self.layernorm = nn.LayerNorm(width, eps=vision_config.layer_norm_eps)
        self.mlp = SiglipMLP(vision_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        w, b = self.attention.in_proj_weight, self.attention.in_proj_bias
        value = F.linear(x, w[2 * width :], b[2 * width :])
        return value + self.mlp(self.layernorm(value))

    def probe_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Probe attention weights averaged over heads: (B, S, C) -> (B, S)."""
        B, S, width = x.shape
        heads = self.attention.num_heads
        w, b = self.attention.in_proj_weight, self.attention.in_proj_bias
        q = F.linear(self.probe, w[:width], b[:width]).reshape(1, heads, width // heads)
        k = F.linear(x, w[width : 2 * width], b[width : 2 * width]).reshape(B, S, heads, width // heads)
        scores = torch.einsum("hd,bshd->bhs", q[0] / (width // heads) ** 0.5, k)
        return scores.softmax(dim=-1).mean(dim=1)


class PromptGuidedProjector(nn.Module):
    def __init__(self, config, alignment: AlignmentConfig):
        super().__init__()
        self.config = config
        self.alignment = alignment
        vision_hidden = config.vision["hidden_size"]
        llm_hidden = config.llm_hidden_size
        self.linear_1 = nn.Linear(vision_hidden, llm_hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(llm_hidden, llm_hidden)
        self.clip_text_model = build_text_tower(alignment, config.attn_implementation)
        self.clip_visual_ln = nn.LayerNorm(vision_hidden, eps=alignment.vision_layer_norm_eps)
        text_width = alignment.text["hidden_size"]
        if alignment.kind == "clip":
            self.clip_visual_projection = nn.Linear(vision_hidden, alignment.projection_dim, bias=False)
            self.clip_text_projection = nn.Linear(text_width, alignment.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        else:
            self.clip_visual_head = SiglipPatchHead(config.hf_vision_config())
            self.logit_scale = nn.Parameter(torch.zeros(1))
            self.logit_bias = nn.Parameter(torch.zeros(1))

    # ------------------------------------------------------------------ stage 2
    def text_embedding(self, clip_ids: torch.Tensor, clip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(1, L) alignment ids -> (1, P) L2-normalised question embedding."""
        pooled = self.clip_text_model(input_ids=clip_ids, attention_mask=clip_mask).pooler_output
        if self.alignment.kind == "clip":
            pooled = self.clip_text_projection(pooled)
        return pooled / pooled.norm(p=2, dim=-1, keepdim=True)

    # ------------------------------------------------------------------ stage 3
    def relevance(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(T, N, C) features and (1, P) question -> (T*N,) softmax weights over all tokens."""
        if self.alignment.kind == "clip":
            visual = self.clip_visual_projection(self.clip_visual_ln(features))
        else:
            visual = self.clip_visual_head(self.clip_visual_ln(features))
        visual = visual / visual.norm(p=2, dim=-1, keepdim=True)
        logits = visual.reshape(-1, visual.shape[-1]) @ text[0].to(visual.dtype)  # (T*N,)
        logits = logits * self.logit_scale.exp()
        if self.alignment.kind == "siglip":
            logits = logits + self.logit_bias  # cancels in the softmax; kept for bit-faithfulness
        weights = logits.reshape(-1).softmax(dim=-1)
        if self.config.valuew_plus:
            attn = self.clip_visual_head.probe_attention(self.clip_visual_ln(features))  # (T, N)
            weights = attn.reshape(-1) * weights * 1000
        return weights

    def pool(self, features: torch.Tensor, text: torch.Tensor, plan: WindowPlan, plain: bool = False) -> torch.Tensor:
        """(T, N, C) features -> (K, D) visual tokens for the window plan.

        linear_2 is applied after pooling: the window weights sum to 1 and linear_2 is affine, so
        this equals upstream's per-token linear_2 (``plain=True``) while doing K instead of T*N
        matrix products.
        """
        T = features.shape[0]
        grid = (T, *self.config.grid)
        weights = self.relevance(features, text)
        hidden = self.act(self.linear_1(features)).reshape(T * self.config.num_patches, -1)
        if plain:
            hidden = self.linear_2(hidden)
        pooled = weighted_window_pool(hidden, weights, grid, plan, self.config.pooling.temperature)
        return pooled if plain else self.linear_2(pooled)

    def pool_gather(self, features: torch.Tensor, text: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """The same pooling driven by a (K, W) window-index table (``WindowPlan.window_index``).

        One traced graph serves every plan (video, image, any token budget); the table is computed
        on the host. Gather -> softmax(relevance / temperature) per window -> weighted sum -> linear_2.
        """
        T = features.shape[0]
        weights = self.relevance(features, text)  # (T*N,)
        hidden = self.act(self.linear_1(features)).reshape(T * features.shape[1], -1)  # (T*N, D)
        window_weights = torch.softmax(weights[window_index] / self.config.pooling.temperature, dim=-1)  # (K, W)
        pooled = (hidden[window_index] * window_weights[..., None]).sum(dim=1)  # (K, D)
        return self.linear_2(pooled)
