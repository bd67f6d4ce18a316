"""Exportable wrappers around the reference's stages: each calls the reference method, nothing else.

The wrappers exist only to give each stage a plain tensor-in / tensor-out ``forward`` with the
input names, order and dynamic axes that ``ppllava.runtime`` and TensorRT expect (one dict per stage,
``STAGES``). Input validation lives in ``PPLLaVA``'s public methods and is bypassed here because it
reads tensor values, which a traced graph cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class VisionStage(nn.Module):
    """pixel_values (T, 3, S, S) -> features (T, N, C); the whole clip in one call (BT-Adapter)."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.vision_tower

    def forward(self, pixel_values):
        return self.tower(pixel_values)


class TextStage(nn.Module):
    """clip_ids, clip_mask (1, L) -> normalised question embedding (1, P)."""

    def __init__(self, model):
        super().__init__()
        self.projector = model.multi_modal_projector

    def forward(self, clip_ids, clip_mask):
        return self.projector.text_embedding(clip_ids, clip_mask)


class PoolStage(nn.Module):
    """features (T, N, C), text (1, P), window_index (K, W) -> visual tokens (K, D)."""

    def __init__(self, model):
        super().__init__()
        self.projector = model.multi_modal_projector

    def forward(self, features, text_embedding, window_index):
        return self.projector.pool_gather(features, text_embedding, window_index)


@dataclass(frozen=True)
class StageSpec:
    name: str
    wrapper: type
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


STAGES = {
    "vision": StageSpec("vision", VisionStage, ("pixel_values",), ("features",)),
    "text": StageSpec("text", TextStage, ("clip_ids", "clip_mask"), ("text_embedding",)),
    "pool": StageSpec("pool", PoolStage, ("features", "text_embedding", "window_index"), ("visual_tokens",)),
}
