"""How far float32 rounding alone can move an output: the yardstick for parity tolerances.

Two correct implementations of one computation differ by rounding. Another CPU, or another ATen
kernel set on the same CPU (``ATEN_CPU_CAPABILITY=default|avx2|avx512``, NEON on a Jetson), sums in
another order and fuses multiply-adds differently. By backward error analysis each result is the
exact computation on weights and inputs perturbed by a few units in the last place (a float32 dot
product of n terms, summed in any order: at most (n - 1) u relative per term, typically sqrt(n) u).
So the natural unit of a parity tolerance is the response of the output to a one-ulp perturbation
of every weight and every input, measured on the very inputs being compared. A fixed number is not:
prompt-guided pooling (a softmax at temperature 0.01 over similarities scaled by 100) turns 1e-7
changes of its inputs into 1e-5 changes of the visual tokens, where a linear layer moves 1e-7.

``rounding_bound`` measures that response (the largest change over a few random-sign one-ulp
perturbations) and scales it by ``ULP_FACTOR``:

- each of two implementations carries its own rounding: a factor 2;
- their per-operation rounding differs by a few ulp, not one (reordered sums of the <= 128 terms in
  the tiny models' widths: sqrt(128) ~ 11 typical): a factor 8;

16 in all. Measured on the fixtures in tests/data/upstream (8 cases x 5 outputs plus the logits of
2 padded cases: 42 comparisons, under ``ATEN_CPU_CAPABILITY=default``, ``avx2`` and ``avx512`` on an
AMD EPYC), real differences between upstream and us stayed at or below 1.3x the one-ulp response:
a 12x margin. A semantic bug moves outputs far more than rounding does on well-conditioned inputs
(a missing softmax, a transposed layout or a wrong position table by 1e-2 to 1; even tanh-GELU in
place of exact GELU by ~6e-4 against bounds of 2e-5 to 2e-4 on most cases), but the bound is
the computation's own, so an ill-conditioned case is a weaker check than a well-conditioned one;
``Bound.check_power`` refuses a bound so loose that it could not see a 1% deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ppllava.seeded import Seeded

ULP_FACTOR = 16.0
TRIALS = 3
# A bound above this fraction of the output's magnitude cannot tell rounding from a bug.
MAX_RELATIVE_BOUND = 1e-2


@dataclass(frozen=True)
class Bound:
    """A tolerance derived from the measured one-ulp sensitivity of one output."""

    sensitivity: float  # max |f(weights, x nudged by 1 ulp) - f(weights, x)| over the trials
    factor: float
    scale: float  # max |f| on the unperturbed inputs

    @property
    def value(self) -> float:
        # Never below 4 ulp of the output's own magnitude (an output that is exact to the last bit
        # under perturbation still rounds once when it is stored).
        return max(self.factor * self.sensitivity, 4 * float(np.spacing(np.float32(self.scale))))

    def describe(self) -> str:
        return (f"{self.value:.2e} = {self.factor:g} x {self.sensitivity:.2e}, the most a one-ulp perturbation "
                f"of every weight and input moved it (output scale {self.scale:.2g})")

    def check_power(self, what: str) -> None:
        """Fail if the bound is too loose to tell rounding from a semantic deviation."""
        if self.value > MAX_RELATIVE_BOUND * max(self.scale, 1e-30):
            raise AssertionError(
                f"{what}: rounding alone moves this output by {self.sensitivity:.2e} (scale {self.scale:.2g}); "
                f"a bound of {self.value:.2e} could not see a deviation of {MAX_RELATIVE_BOUND:.0%}: choose "
                "better-conditioned inputs"
            )


def nudge(tensor: torch.Tensor, gen: Seeded, back: bool = False) -> torch.Tensor:
    """``tensor`` with every float element moved one ulp up or down (random, portable signs).
    ``back=True`` with a generator in the same state moves each element back where it came from."""
    if not tensor.is_floating_point():
        return tensor
    up = torch.from_numpy(gen.coin(*tensor.shape)).to(tensor.device)
    if back:
        up = ~up
    inf = torch.tensor(float("inf"), dtype=tensor.dtype, device=tensor.device)
    moved = torch.nextafter(tensor, torch.where(up, inf, -inf))
    # Zeros and non-finite values stay as they are (one ulp from 0 is a denormal that would come
    # back as -0.0 or not at all; inf would come back as the largest finite value), so moving back
    # restores every element exactly, except one at +-FLT_MAX or +-denorm_min, which no real weight
    # is; rounding_bound checks the restored result anyway.
    keep = (tensor == 0) | ~torch.isfinite(tensor)
    return torch.where(keep, tensor, moved)


def _nudge_module(module: torch.nn.Module, seed: int, back: bool = False) -> None:
    gen = Seeded(seed)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            tensor.copy_(nudge(tensor, gen, back=back))


def rounding_bound(fn: Callable[..., torch.Tensor], module: torch.nn.Module, *inputs, trials: int = TRIALS,
                   seed: int = 0, factor: float = ULP_FACTOR, weights: bool = True) -> Bound:
    """The tolerance for comparing ``fn(module, *inputs)`` with another implementation of it.

    ``fn`` is called on ``module`` and again with its floating-point parameters and buffers, like
    the floating-point ``inputs``, each nudged by one ulp with random signs. The weights are nudged
    in place and moved back exactly afterwards (no copy of the model, so a 7B reference can be
    measured too); ``weights=False`` nudges the inputs only.
    """
    with torch.no_grad():
        base = fn(module, *inputs).detach().float()
        worst = 0.0
        for trial in range(trials):
            gen = Seeded(seed + trial)
            nudged_inputs = [nudge(x, gen) if isinstance(x, torch.Tensor) else x for x in inputs]
            if weights:
                _nudge_module(module, seed + 1000 + trial)
            try:
                moved = fn(module, *nudged_inputs)
            finally:
                if weights:
                    _nudge_module(module, seed + 1000 + trial, back=True)
            worst = max(worst, float((moved.detach().float() - base).abs().max()))
        again = fn(module, *inputs).detach().float()
        if not torch.equal(again, base):  # the weights are back bit for bit, or fn is not deterministic
            raise RuntimeError("rounding_bound: the function gave another result after the weights were restored")
    return Bound(sensitivity=worst, factor=factor, scale=float(base.abs().max()))


# A model run in a lower precision (bf16) rounds its weights once, which ``cast_bound`` measures,
# and then every activation at every operation, a perturbation of the same order per layer: 8x the
# weight-cast response covers both with room (measured on the tiny models: 1.8-2.2x, under
# ATEN_CPU_CAPABILITY=default and avx512).
CAST_FACTOR = 8.0


def cast_bound(fn: Callable[..., torch.Tensor], module: torch.nn.Module, *inputs, dtype=torch.bfloat16,
               factor: float = CAST_FACTOR) -> Bound:
    """The tolerance for comparing ``fn(module, *inputs)`` with the same computation run in ``dtype``:
    the change of the float32 output when every floating-point parameter and input is rounded to
    ``dtype`` once (deterministic; restored bit for bit afterwards), times ``factor``. Buffers are
    not rounded: a low-precision model keeps them in float32 (RoPE's inverse frequencies), so a
    model that rounds them is outside what this bound explains."""
    with torch.no_grad():
        base = fn(module, *inputs).detach().float()
        saved = [(t, t.detach().clone()) for t in module.parameters() if t.is_floating_point()]
        try:
            for tensor, _ in saved:
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
            rounded = [x.to(dtype).to(x.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                       for x in inputs]
            moved = fn(module, *rounded).detach().float()
        finally:
            for tensor, value in saved:
                tensor.copy_(value)
    return Bound(sensitivity=float((moved - base).abs().max()), factor=factor, scale=float(base.abs().max()))


@dataclass
class GreedyVerdict:
    """Greedy tokens of an implementation against a reference's, judged where they are decidable."""

    steps: int
    compared: int  # steps up to the first one inside the bound (all of them if none is)
    ambiguous: list[tuple[int, float]]  # (step, top-2 gap) of steps whose gap is within 2 x bound
    mismatches: list[tuple[int, int, int, float]]  # (step, chosen, reference, gap) at decidable steps

    def describe(self) -> str:
        text = f"{self.steps - len(self.ambiguous)}/{self.steps} steps decidable"
        if self.ambiguous:
            step, gap = self.ambiguous[0]
            text += f"; first near-tie at step {step} (top-2 gap {gap:.2e})"
        return text


def greedy_verdict(step_logits, reference: list[int], chosen: list[int], bound: float) -> GreedyVerdict:
    """Judge ``chosen`` (the implementation's greedy choice at each step, fed the reference's tokens
    before it: teacher forcing) against ``reference`` (the reference's greedy tokens, chosen from
    ``step_logits`` (steps, V)). A step whose top-2 gap is within twice the logit ``bound`` is a
    near-tie that rounding may decide either way: it is reported, not judged; every other step must
    agree exactly."""
    logits = np.asarray(step_logits, dtype=np.float64)
    if not len(logits) == len(reference) == len(chosen):
        raise ValueError(f"greedy_verdict: {len(logits)} logit rows, {len(reference)} reference tokens, "
                         f"{len(chosen)} choices: one per step each")
    ambiguous, mismatches = [], []
    for step, (row, want, got) in enumerate(zip(logits, reference, chosen)):
        top2 = np.partition(row, -2)[-2:]
        gap = float(top2[1] - top2[0])
        if gap <= 2 * bound:
            ambiguous.append((step, gap))
        elif got != want:
            mismatches.append((step, int(got), int(want), gap))
    compared = ambiguous[0][0] if ambiguous else len(reference)
    return GreedyVerdict(len(reference), compared, ambiguous, mismatches)
