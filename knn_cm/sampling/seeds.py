"""Per-seed initial noise: sample i always uses seed i, whatever batch it is generated in (EDM's generate.py)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def _is_seed(seed) -> bool:
    """True for an integer torch.Generator.manual_seed accepts without wrapping: 0 <= seed < 2^64."""
    return isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**64


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int], device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [len(seeds), C, H, W]; row i is drawn from a generator seeded with seeds[i].

    Each row comes from its own ``torch.Generator(device).manual_seed(seed)`` (as EDM's
    StackedRandomGenerator does), so a sample's noise does not depend on the other seeds in its batch;
    the same seed gives the same noise on the same device type and torch version.

    Args:
        seeds: integers in [0, 2^64), one per sample (e.g. ``range(50_000)``).
        shape: per-sample shape (C, H, W).
        device: where generators and noise live.
        dtype: floating dtype of the noise.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: give one seed per sample, e.g. range(16)")
    bad = [seed for seed in seeds if not _is_seed(seed)]
    if bad:
        raise ValueError(f"seeds must be integers in [0, 2^64), got {bad[0]!r}")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(size, numbers.Integral) and size >= 1 for size in shape):
        raise ValueError(f"shape must be the per-sample (C, H, W) of positive integers, got {shape}")
    device = torch.device(device)
    rows = [torch.randn(shape, generator=torch.Generator(device).manual_seed(int(seed)), device=device, dtype=dtype)
            for seed in seeds]
    return torch.stack(rows)
