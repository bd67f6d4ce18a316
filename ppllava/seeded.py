"""Seeded random numbers that are the same bytes on every CPU.

``torch.randn`` fills a CPU tensor with a vectorised Box-Muller whose stream depends on the SIMD
width the ATen dispatcher picked: ``ATEN_CPU_CAPABILITY=default``, ``avx2`` and ``avx512`` give
three different tensors for one seed, and NEON (Jetson) a fourth. Anything seeded that must be
reproducible across machines (test and demo checkpoints, verification inputs) draws here instead:
numpy's PCG64 is defined on 64-bit integers and its ziggurat normal sampler is scalar float64 code,
the same on every architecture. Values are drawn in float64, shifted and scaled in float64 (exact
IEEE operations), then rounded once to the target dtype.

This module needs numpy only, so the torch-free runtime may use it too.
"""

from __future__ import annotations

import numpy as np


class Seeded:
    """A portable seeded stream: ``Seeded(0).normal(3, 4)`` is the same array on every CPU."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0, dtype=np.float32) -> np.ndarray:
        """``mean + std * N(0, 1)`` of ``shape``, computed in float64 and rounded once to ``dtype``."""
        values = self._rng.standard_normal(shape)
        if std != 1.0:
            values *= std
        if mean != 0.0:
            values += mean
        return values.astype(dtype)

    def integers(self, low: int, high: int, *shape: int) -> np.ndarray:
        """Uniform int64 values in ``[low, high)`` (integer arithmetic only)."""
        return self._rng.integers(low, high, size=shape, dtype=np.int64)

    def coin(self, *shape: int) -> np.ndarray:
        """Fair random booleans of ``shape`` (integer arithmetic only)."""
        return self._rng.integers(0, 2, size=shape, dtype=np.uint8).astype(bool)
