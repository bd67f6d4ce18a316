"""Pooling maths against a naive loop. Guards against window-order, axis-swap and renormalisation bugs."""

from __future__ import annotations

import itertools

import pytest
import torch

from ppllava.plan import WindowPlan
from ppllava.pooling import weighted_window_pool

pytestmark = pytest.mark.numerics  # floating-point verdicts: CI reruns them under ATEN_CPU_CAPABILITY=default


def naive_pool(values, relevance, grid, kernel, stride, out, temperature):
    """Window by window, as PPLLAVA.md states it: second softmax of w / temp inside each window."""
    T, H, W = grid
    v = values.reshape(T, H, W, -1)
    r = relevance.reshape(T, H, W)
    tokens = []
    for i, j, k in itertools.product(range(out[0]), range(out[1]), range(out[2])):
        t0, h0, w0 = i * stride[0], j * stride[1], k * stride[2]
        win_v = v[t0 : t0 + kernel[0], h0 : h0 + kernel[1], w0 : w0 + kernel[2]].reshape(-1, v.shape[-1])
        win_r = r[t0 : t0 + kernel[0], h0 : h0 + kernel[1], w0 : w0 + kernel[2]].reshape(-1)
        weights = torch.softmax(win_r / temperature, dim=0)
        tokens.append((weights[:, None] * win_v).sum(dim=0))
    return torch.stack(tokens)


CASES = [
    # grid (T, H, W), plan, expected output grid
    ((5, 6, 6), WindowPlan(kernel=(2, 3, 3), stride=(2, 3, 3)), (2, 2, 2)),  # odd T: last frame dropped
    ((4, 6, 6), WindowPlan(kernel=(2, 3, 3), stride=(2, 3, 3)), (2, 2, 2)),
    ((1, 6, 6), WindowPlan(kernel=(1, 3, 3), stride=(1, 3, 3)), (1, 2, 2)),  # image kernel
    ((3, 4, 7), WindowPlan(kernel=(1, 2, 3), stride=(1, 2, 2)), (3, 2, 3)),  # non-square, overlapping
    ((7, 6, 9), WindowPlan(output_shape=(3, 2, 4)), (3, 2, 4)),  # requested output shape
    ((6, 24, 24), WindowPlan(output_shape=(3, 8, 8)), (3, 8, 8)),
    ((5, 5, 8), WindowPlan(output_shape=(2, 2, 3), stride=(2, 2, 2)), (2, 2, 3)),
    ((5, 5, 8), WindowPlan(output_shape=(2, 2, 3), kernel=(2, 3, 2)), (2, 2, 3)),
]


@pytest.mark.parametrize("grid,plan,expected", CASES)
def test_pool_matches_naive_loop(grid, plan, expected):
    torch.manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    values = torch.randn(n, 5, dtype=torch.float64)
    relevance = torch.softmax(torch.randn(n, dtype=torch.float64) * 3, dim=0)
    out, kernel, stride = plan.resolve(grid)
    assert out == expected
    got = weighted_window_pool(values, relevance, grid, plan, temperature=0.01)
    want = naive_pool(values, relevance, grid, kernel, stride, out, 0.01)
    assert got.shape == (expected[0] * expected[1] * expected[2], 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_output_shape_plan_follows_upstream_get_size():
    # stride = in // out, kernel = in - (out - 1) * stride
    assert WindowPlan(output_shape=(16, 8, 8)).resolve((32, 24, 24)) == ((16, 8, 8), (2, 3, 3), (2, 3, 3))
    assert WindowPlan(output_shape=(4, 5, 5)).resolve((9, 24, 24)) == ((4, 5, 5), (3, 8, 8), (2, 4, 4))


@pytest.mark.parametrize(
    "plan,grid",
    [
        (WindowPlan(kernel=(2, 3, 3), stride=(2, 3, 3)), (1, 6, 6)),  # one frame cannot fill a 2-frame window
        (WindowPlan(kernel=(1, 7, 3), stride=(1, 3, 3)), (4, 6, 6)),
        (WindowPlan(output_shape=(8, 2, 2)), (4, 6, 6)),
        (WindowPlan(kernel=(2, 3, 3)), (4, 6, 6)),  # incomplete plan
    ],
)
def test_plans_that_do_not_fit_are_refused(plan, grid):
    with pytest.raises(ValueError):
        plan.resolve(grid)


def test_weights_renormalised_per_window():
    # A huge relevance on one token makes its window return exactly that token's value.
    grid = (2, 3, 3)
    values = torch.arange(18 * 2, dtype=torch.float64).reshape(18, 2)
    relevance = torch.zeros(18, dtype=torch.float64)
    relevance[7] = 1.0
    got = weighted_window_pool(values, relevance, grid, WindowPlan(kernel=(2, 3, 3), stride=(2, 3, 3)), 0.01)
    torch.testing.assert_close(got[0], values[7])
