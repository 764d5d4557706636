"""The pixel convention: uint8 {0..255} <-> floats in [-1, 1] (x = u / 127.5 - 1)."""

from __future__ import annotations

import torch


def uint8_to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 pixel values {0..255} to floats in [-1, 1]: x = u / 127.5 - 1 (computed in ``dtype``)."""
    return images.to(dtype).div_(127.5).sub_(1.0)


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`uint8_to_float`, rounding and clamping to {0..255}."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
