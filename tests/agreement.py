"""Greedy tokens of an engine against the reference, judged where rounding cannot decide them.

Two correct float32 implementations (onnxruntime and PyTorch, or PyTorch under two kernel sets)
may pick different tokens at a near-tie of the top two logits. Every step whose top-2 gap exceeds
twice the reference's measured rounding bound (ppllava.numerics) must agree exactly, along the
reference's own path (teacher forcing); free-running tokens must agree up to the first near-tie.
"""

from __future__ import annotations

import warnings

import torch

from ppllava.numerics import greedy_verdict, rounding_bound


def reference_step_logits(model, ids, tokens, **inputs):
    """The reference's logits before each of ``tokens`` (the prompt, then the tokens, teacher-forced)."""
    ext = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=ids.dtype)], dim=1)
    logits = model(ext, **inputs).logits[0]
    return logits[logits.shape[0] - len(tokens):]


def assert_greedy_agrees(model, pipe, got: list[int], px, clip_ids, ids, clip_mask=None, media_type="video",
                         max_new_tokens: int = 8, label: str = "") -> None:
    """``got`` (the engine's free-running greedy tokens) against the reference's, on ``pipe``'s own
    teacher-forced choices; near-ties are reported as warnings."""
    inputs = dict(clip_ids=clip_ids, clip_mask=clip_mask, media_type=media_type)
    want = model.generate(ids, pixel_values=px, max_new_tokens=max_new_tokens, **inputs)[0].tolist()
    if not want:
        assert got == want, label
        return

    chosen = pipe.forced_choices(px.numpy(), clip_ids.numpy(), ids.numpy(), want,
                                 None if clip_mask is None else clip_mask.numpy(), media_type)
    if got == want and chosen == want:
        return  # identical: nothing for a rounding bound to decide

    def forced(m, pixels):
        return reference_step_logits(m, ids, want, pixel_values=pixels, **inputs)

    with torch.no_grad():
        logits = forced(model, px)
    bound = rounding_bound(forced, model, px)
    verdict = greedy_verdict(logits, want, chosen, bound.value)
    for step, gap in verdict.ambiguous:
        warnings.warn(f"{label}: greedy step {step} is a near-tie (top-2 gap {gap:.2e} within 2 x {bound.value:.2e})")
    assert not verdict.mismatches, f"{label}: (step, engine, reference, gap) {verdict.mismatches}; {bound.describe()}"
    decidable = verdict.steps - len(verdict.ambiguous)
    assert decidable >= verdict.steps / 2, f"{label}: only {decidable}/{verdict.steps} steps decidable ({bound.describe()})"
    assert got[: verdict.compared] == want[: verdict.compared], f"{label}: {got} != {want} before step {verdict.compared}"
