"""One-step and multistep consistency-model sampling (Song et al. 2023, Algorithm 1; iCT, Song & Dhariwal 2024).

    x = f(sigma_0 z, sigma_0),  z ~ N(0, I)
    for each later sigma:  x = f(x + sqrt(sigma^2 - sigma_min^2) eps, sigma),  eps ~ N(0, I)

The re-injected noise has variance sigma^2 - sigma_min^2 because f's boundary is sigma_min, not 0.
Each denoised estimate x is clamped to the data range [-1, 1] before noise is added again, as the
consistency-model reference sampler does (its ``clip_denoised``); ``clip_denoised=False`` turns that off.
iCT on CIFAR-10 (docs/hyperparameters.md#ict): one step from 80, or two steps with the intermediate sigma 0.821.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch

from knn_cm.sampling.ode import check_noise, denoise

ConsistencyFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_consistency_sigmas(sigmas, sigma_min) -> list[float]:
    is_number = isinstance(sigma_min, numbers.Real) and not isinstance(sigma_min, bool)
    if not (is_number and math.isfinite(sigma_min) and sigma_min > 0):
        raise ValueError(f"sigma_min must be finite and > 0, got {sigma_min!r}")
    sigmas = [float(sigma) for sigma in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level, e.g. (80.0,) or (80.0, 0.821)")
    if not all(math.isfinite(sigma) and sigma >= sigma_min for sigma in sigmas):
        raise ValueError(f"sigmas must be finite and >= sigma_min ({sigma_min!r}), got {sigmas}")
    if any(later >= earlier for earlier, later in pairwise(sigmas)):
        raise ValueError(f"sigmas must be strictly descending, got {sigmas}")
    return sigmas


@torch.no_grad()
def consistency_sample(consistency_fn: ConsistencyFunction, noise: torch.Tensor,
                       sigmas: Sequence[float] = (80.0,), sigma_min: float = 0.002,
                       generator: torch.Generator | None = None, clip_denoised: bool = True) -> torch.Tensor:
    """Consistency sampling with len(sigmas) evaluations of f.

    Args:
        consistency_fn: f(z [B, C, H, W] float32, sigma [B] float32) -> x [B, C, H, W], e.g. ``CMPrecond``.
        noise: standard normal [B, C, H, W]; the first evaluation is f(sigmas[0] noise, sigmas[0]).
        sigmas: strictly descending noise levels, each >= sigma_min: (80.0,) one-step, (80.0, 0.821) iCT's
            two-step sampler.
        sigma_min: f's boundary noise level (f(z, sigma_min) = z).
        generator: draws the re-injected noise eps (float32 standard normal of noise's shape, one draw
            per later sigma, in order), on noise's device.
        clip_denoised: clamp every denoised estimate, intermediate and final, to [-1, 1] (the reference
            sampler's default); False keeps f's raw outputs, so an intermediate estimate outside the data
            range is noised as it is.

    Returns:
        float32 samples [B, C, H, W].
    """
    check_noise(noise)
    if not callable(consistency_fn):
        raise ValueError(f"consistency_fn must be callable as f(z, sigma), got {type(consistency_fn).__name__}")
    sigmas = _check_consistency_sigmas(sigmas, sigma_min)
    if not isinstance(clip_denoised, bool):
        raise ValueError(f"clip_denoised must be true or false, got {clip_denoised!r}")

    def denoised(z, sigma):
        x = denoise(consistency_fn, z, sigma)
        return x.clamp(-1.0, 1.0) if clip_denoised else x

    x = denoised(noise.to(torch.float64) * sigmas[0], sigmas[0])
    for sigma in sigmas[1:]:
        eps = torch.randn(noise.shape, generator=generator, dtype=torch.float32, device=noise.device)
        z = x + math.sqrt(sigma**2 - sigma_min**2) * eps.to(torch.float64)
        x = denoised(z, sigma)
    return x.to(torch.float32)
