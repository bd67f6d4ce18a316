"""Window plans for prompt-guided pooling: which (T, H, W) windows become one visual token.

Torch-free arithmetic (numpy only), shared by the reference and the runtime. A plan is either kernel + stride (output size follows, a trailing part that
does not fill a window is dropped) or a requested output shape (stride = in // out,
kernel = in - (out - 1) * stride), exactly as upstream's ``get_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Triple = tuple[int, int, int]


def plan_for_budget(tokens: int, input_shape: Triple, time_per_side: float = 2.0) -> "WindowPlan":
    """An output-shape plan with at most ``tokens`` visual tokens.

    Among square spatial grids, keep those within 10% of the most tokens that fit, then take the one
    whose time-steps : grid-side ratio is closest to ``time_per_side`` (2.0 is the released models'
    16 x 8 x 8 at 32 frames), so budgets near the default reproduce the default shape.
    """
    import math

    T, H, W = (int(v) for v in input_shape)
    if tokens < 1:
        raise ValueError(f"a token budget must be >= 1, got {tokens}")
    candidates = [(min(T, tokens // (side * side)), side) for side in range(1, min(H, W) + 1)]
    candidates = [(t, side) for t, side in candidates if t >= 1]
    most = max(t * side * side for t, side in candidates)
    close = [(t, side) for t, side in candidates if t * side * side >= 0.9 * most]
    if T == 1:  # one frame: no time axis to balance, keep the most tokens
        t, side = max(candidates, key=lambda c: c[0] * c[1] ** 2)
    else:
        t, side = min(close, key=lambda c: (abs(math.log((c[0] / c[1]) / time_per_side)), -c[0] * c[1] ** 2))
    return WindowPlan(output_shape=(t, side, side))


@dataclass(frozen=True)
class WindowPlan:
    kernel: Triple | None = None
    stride: Triple | None = None
    output_shape: Triple | None = None

    def check_defined(self) -> None:
        given = (self.kernel is not None, self.stride is not None, self.output_shape is not None)
        if given not in ((True, True, False), (False, False, True), (False, True, True), (True, False, True)):
            raise ValueError(
                "a window plan needs kernel and stride, or an output shape (optionally with one of kernel "
                f"or stride); got kernel={self.kernel}, stride={self.stride}, output_shape={self.output_shape}"
            )
        for name, value in (("kernel", self.kernel), ("stride", self.stride), ("output_shape", self.output_shape)):
            if value is not None and (len(value) != 3 or any(int(v) < 1 for v in value)):
                raise ValueError(f"{name} must be three positive integers, got {value}")

    def resolve(self, input_shape: Triple) -> tuple[Triple, Triple, Triple]:
        """Return (output, kernel, stride) for a (T, H, W) input grid; ValueError if it does not fit."""
        self.check_defined()
        size = tuple(int(v) for v in input_shape)
        if self.output_shape is None:
            kernel, stride = self.kernel, self.stride
            out = tuple((i - k) // s + 1 if i >= k else 0 for i, k, s in zip(size, kernel, stride))
        elif self.kernel is None and self.stride is None:
            out = self.output_shape
            stride = tuple(i // o for i, o in zip(size, out))
            kernel = tuple(i - (o - 1) * s for i, o, s in zip(size, out, stride))
        elif self.kernel is None:
            out, stride = self.output_shape, self.stride
            kernel = tuple(i - (o - 1) * s for i, o, s in zip(size, out, stride))
        else:
            out, kernel = self.output_shape, self.kernel
            stride = tuple((i - k) // (o - 1) if o > 1 else k for i, o, k in zip(size, out, kernel))
        axes = ("frames", "rows", "columns")
        for axis, i, o, k, s in zip(axes, size, out, kernel, stride):
            if o < 1 or k < 1 or s < 1 or k > i or (o - 1) * s + k > i:
                raise ValueError(
                    f"window plan does not fit {axis}: input {i}, kernel {k}, stride {s}, output {o} "
                    f"(input grid {size}, kernel {kernel}, stride {stride}, output {out})"
                )
        return tuple(out), tuple(kernel), tuple(stride)

    def output_grid(self, input_shape: Triple) -> Triple:
        return self.resolve(input_shape)[0]

    def window_index(self, input_shape: Triple) -> np.ndarray:
        """(K, W) int64 table: row k lists the flat (time, row, column) indices of the tokens in
        output window k, in the order the windows unfold (W = kT * kH * kW).

        This is what lets one exported pooling graph serve every plan: gather, softmax, weighted sum.
        """
        (o_t, o_h, o_w), (k_t, k_h, k_w), (s_t, s_h, s_w) = self.resolve(input_shape)
        _, H, W = (int(v) for v in input_shape)
        t = (np.arange(o_t) * s_t)[:, None] + np.arange(k_t)  # (o_t, k_t)
        h = (np.arange(o_h) * s_h)[:, None] + np.arange(k_h)
        w = (np.arange(o_w) * s_w)[:, None] + np.arange(k_w)
        index = (
            t[:, None, None, :, None, None] * (H * W)
            + h[None, :, None, None, :, None] * W
            + w[None, None, :, None, None, :]
        )  # (o_t, o_h, o_w, k_t, k_h, k_w)
        return index.reshape(o_t * o_h * o_w, k_t * k_h * k_w).astype(np.int64)
