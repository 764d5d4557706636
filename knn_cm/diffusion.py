"""Noise processes z = s(t) (x + sigma(t) eps) and their scores through any posterior-mean estimator.

VE/EDM (sigma(t) = t, s(t) = 1) is the paper's default; VP (Eq. 44-45) is the usual alternative.
Appendix B (Algorithm 2): for any process, E[x | z, t] is the VE posterior mean at the query z / s(t)
and noise level sigma(t), so every estimator serves every process unchanged:
    grad_z log p_t(z) = (E[x | z / s(t), sigma(t)] - z / s(t)) / (s(t) sigma(t)^2)      (Eq. 58)
"""

from __future__ import annotations

import math

import torch


def _as_batch(t, batch: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(1).expand(batch) if t.numel() == 1 else t.reshape(batch)


class NoiseProcess:
    """A Gaussian diffusion process given by sigma(t) and s(t); subclasses define both."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """z = s(t) (x + sigma(t) eps) for x, eps [B, ...] and t scalar or [B] (Eq. 46)."""
        t = _as_batch(t, x.shape[0], x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return self.scale(t).reshape(shape) * (x + self.sigma(t).reshape(shape) * noise)

    def posterior_mean(self, estimator, z: torch.Tensor, t, **kwargs) -> torch.Tensor:
        """E[x | z, t] [B, ...] = estimator(z / s(t), sigma(t)) (Algorithm 2's query and noise level)."""
        t = _as_batch(t, z.shape[0], z)
        shape = (-1,) + (1,) * (z.ndim - 1)
        return estimator(z / self.scale(t).reshape(shape), self.sigma(t), **kwargs)

    def score(self, estimator, z: torch.Tensor, t, **kwargs) -> torch.Tensor:
        """grad_z log p_t(z) [B, ...] by Eq. 58."""
        t = _as_batch(t, z.shape[0], z)
        shape = (-1,) + (1,) * (z.ndim - 1)
        scale, sigma = self.scale(t).reshape(shape), self.sigma(t).reshape(shape)
        x_hat = estimator(z / scale, self.sigma(t), **kwargs)
        return (x_hat - z / scale) / (scale * sigma**2)


class VEProcess(NoiseProcess):
    """Variance exploding / EDM: sigma(t) = t, s(t) = 1 (the paper's choice, Eq. 3)."""

    def sigma(self, t):
        return torch.as_tensor(t)

    def scale(self, t):
        return torch.ones_like(torch.as_tensor(t))


class VPProcess(NoiseProcess):
    """Variance preserving (Eq. 44-45): sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1),
    s(t) = 1 / sqrt(e^(beta_d t^2 / 2 + beta_min t)); EDM's defaults beta_d 19.9, beta_min 0.1, t in (0, 1].
    """

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1):
        if not (math.isfinite(beta_d) and math.isfinite(beta_min)) or beta_d < 0 or beta_min < 0:
            raise ValueError(f"beta_d and beta_min must be finite and >= 0, got {beta_d}, {beta_min}")
        self.beta_d = beta_d
        self.beta_min = beta_min

    def _exponent(self, t):
        t = torch.as_tensor(t)
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def sigma(self, t):
        return torch.expm1(self._exponent(t)).sqrt()

    def scale(self, t):
        return torch.exp(-0.5 * self._exponent(t))
