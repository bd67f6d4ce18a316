"""Prompt-guided pooling: relevance-weighted 3D window pooling of projected visual tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ppllava.plan import WindowPlan


def weighted_window_pool(
    values: torch.Tensor, relevance: torch.Tensor, grid: tuple[int, int, int], plan: WindowPlan, temperature: float
) -> torch.Tensor:
    """Pool ``values`` over windows of the (T, H, W) grid, weighting by ``relevance``.

    values: (T*H*W, D) tokens in time, row, column order; relevance: (T*H*W,) weights (a softmax
    over all tokens upstream). Inside each window the weights are renormalised with a second
    softmax of relevance / temperature. Returns (K, D) pooled tokens in time, row, column order.
    """
    (o_t, o_h, o_w), (k_t, k_h, k_w), (s_t, s_h, s_w) = plan.resolve(grid)
    T, H, W = grid
    D = values.shape[-1]
    v = values.reshape(T, H, W, D)
    r = relevance.reshape(T, H, W)
    # unfold each axis: (o_t, o_h, o_w, D, k_t, k_h, k_w) and (o_t, o_h, o_w, k_t, k_h, k_w)
    v = v.unfold(0, k_t, s_t).unfold(1, k_h, s_h).unfold(2, k_w, s_w)
    r = r.unfold(0, k_t, s_t).unfold(1, k_h, s_h).unfold(2, k_w, s_w)
    v = v.reshape(o_t, o_h, o_w, D, k_t * k_h * k_w)
    r = F.softmax(r.reshape(o_t, o_h, o_w, 1, k_t * k_h * k_w) / temperature, dim=-1)
    pooled = (v * r).sum(dim=-1)  # (o_t, o_h, o_w, D)
    return pooled.reshape(o_t * o_h * o_w, D)
