"""Stage 1, the vision tower: (T, 3, S, S) normalised frames -> selected features (T, N, C).

CLIP with BT-Adapter (Vicuna variant) or plain SigLIP (Qwen variant), built from transformers'
embedding and encoder-layer modules. Parameter names follow the upstream checkpoint layout
(``vision_tower.vision_model.*``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.siglip.modeling_siglip import (
    SiglipEncoder,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionEmbeddings,
)

from ppllava.btadapter import BTAdapterMixin, SpatialBlock, TemporalBlock
from ppllava.encoder import run_layer
from ppllava.errors import InputError


class CLIPBTAdapterVision(BTAdapterMixin, nn.Module):
    def __init__(self, config, depth: int, max_T: int):
        super().__init__()
        self.depth = depth
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        # Loaded from the checkpoint but never reaches the LLM (upstream only uses it for the
        # pooled CLS output).
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if depth:
            self.btadapter_S_layers = nn.ModuleList(SpatialBlock(config) for _ in range(depth))
            self.btadapter_T_layers = nn.ModuleList(TemporalBlock(config) for _ in range(depth))
            self.btadapter_time_embed = nn.Embedding(max_T, config.hidden_size)
            self.btadapter_cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def hidden_state(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        """Hidden state ``index`` of upstream's list (entry i = input of ViT layer i), computing only
        the layers and adapter blocks it depends on (the exact "skip what is unused" rewrite)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (T, 1+N, C)
        first_adapter = len(self.encoder.layers) - self.depth
        x2 = None
        for i in range(index):
            x = run_layer(self.encoder.layers[i], x)
            if self.depth and i >= first_adapter:
                x2 = self.adapter_step(i - first_adapter, x, x2)
        return x if x2 is None else self.combine(x, x2)

    def all_hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The plain form, as upstream runs it: every layer and block, every hidden state recorded."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        first_adapter = len(self.encoder.layers) - self.depth
        x2, states = None, []
        for i, layer in enumerate(self.encoder.layers):
            states.append(x if x2 is None else self.combine(x, x2))
            x = run_layer(layer, x)
            if self.depth and i >= first_adapter:
                x2 = self.adapter_step(i - first_adapter, x, x2)
        states.append(x if x2 is None else self.combine(x, x2))
        return states


class SiglipVision(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused, as upstream
        if getattr(config, "vision_use_head", True):
            # transformers' default: checkpoints saved with it carry head.* weights (never used here).
            self.head = SiglipMultiheadAttentionPoolingHead(config)

    def hidden_state(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:index]:
            x = run_layer(layer, x)
        return x

    def all_hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in self.encoder.layers:
            x = run_layer(layer, x)
            states.append(x)
        return states


class VisionTower(nn.Module):
    """Frames of one clip -> the LLaVA side's selected features (T, N, C)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        hf = config.hf_vision_config()
        hf._attn_implementation = config.attn_implementation
        if config.variant == "vicuna":
            self.vision_model = CLIPBTAdapterVision(hf, config.btadapter_depth, config.max_T)
        else:
            self.vision_model = SiglipVision(hf)
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        S = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise InputError(f"pixel_values must be (T, 3, {S}, {S}), got {tuple(pixel_values.shape)}")
        T = pixel_values.shape[0]
        if T < 1:
            raise InputError("pixel_values holds no frames")
        if self.config.btadapter and T > self.config.max_T:
            raise InputError(
                f"{T} frames exceed the BT-Adapter's time embedding (max_T={self.config.max_T}); sample fewer frames"
            )

    def forward(self, pixel_values: torch.Tensor, plain: bool = False) -> torch.Tensor:
        self.check_pixels(pixel_values)
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        if plain:
            x = self.vision_model.all_hidden_states(pixel_values)[self.config.vision_feature_layer]
        else:
            x = self.vision_model.hidden_state(pixel_values, self.config.feature_index)
        return x[:, 1:] if self.drop_cls else x
