"""Noise processes z = s(t) (x + sigma(t) eps) and their scores through any posterior-mean estimator.

VE/EDM (sigma(t) = t, s(t) = 1) is the paper's default; VP (Eq. 44-45) is the usual alternative.
Appendix B (Algorithm 2): for any process, E[x | z, t] is the VE posterior mean at the query z / s(t)
and noise level sigma(t), so every estimator serves every process unchanged:
    grad_z log p_t(z) = (E[x | z / s(t), sigma(t)] - z / s(t)) / (s(t) sigma(t)^2)      (Eq. 58)
"""

from __future__ import annotations

import math
import numbers

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


ODE_SOLVERS = ("euler", "heun")


def pf_ode_step(denoiser, z: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, solver: str = "euler",
                **denoiser_kwargs) -> torch.Tensor:
    """One step of the VE probability-flow ODE dz/dsigma = (z - D(z, sigma)) / sigma (Eq. 3 with Eq. 5).

    Args:
        denoiser: D(z, sigma, **denoiser_kwargs) -> posterior-mean estimate (an estimator or a network).
        z: [B, C, H, W] at noise levels ``sigma_from`` [B]; returns z at ``sigma_to`` [B].
            For Heun every ``sigma_to`` must be > 0 (the denoiser is evaluated there): the callers know it
            on the host (a schedule's levels, a training curriculum with sigma_min > 0), so it is not
            checked here, where it would read a device tensor back on every training step.
        solver: "euler", or "heun" (second order; evaluates the denoiser at both ends).
        denoiser_kwargs: passed to every denoiser call (e.g. the clean source x and a generator).

    With the single-sample estimator (D = x) both solvers give exactly z' = x + sigma_to * eps for
    z = x + sigma_from * eps (Appendix A.5): consistency training's forward-process pair.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; allowed: {', '.join(ODE_SOLVERS)}")
    shape = (-1,) + (1,) * (z.ndim - 1)
    step = (sigma_to - sigma_from).reshape(shape)
    slope = (z - denoiser(z, sigma_from, **denoiser_kwargs)) / sigma_from.reshape(shape)
    z_euler = z + step * slope
    if solver == "euler":
        return z_euler
    slope_end = (z_euler - denoiser(z_euler, sigma_to, **denoiser_kwargs)) / sigma_to.reshape(shape)
    return z + step * 0.5 * (slope + slope_end)


def check_karras_arguments(num_steps, sigma_min, sigma_max, rho) -> None:
    """Raise ValueError naming the first bad argument of a Karras schedule (see :func:`karras_sigmas`)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (math.isfinite(sigma_min) and sigma_min > 0):
        raise ValueError(f"sigma_min must be finite and > 0, got {sigma_min!r}")
    if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
        raise ValueError(f"sigma_max must be finite and > sigma_min ({sigma_min!r}), got {sigma_max!r}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0, got {rho!r}")


def karras_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """EDM's sampling noise levels (Karras et al. 2022, Eq. 5) [num_steps + 1], float64, descending:

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..N-1,

    then sigma_N = 0 appended, as EDM's sampler does. Computed with EDM's exact arithmetic so samplers
    reproduce EDM's time steps bit for bit. ``num_steps`` 1 gives [sigma_max, 0] (EDM divides by zero).
    Unlike ``knn_cm.training.ict.karras_levels`` (ascending training levels) this is the sampling grid.
    """
    check_karras_arguments(num_steps, sigma_min, sigma_max, rho)
    num_steps = int(num_steps)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    first, last = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (first + step_indices / max(num_steps - 1, 1) * (last - first)) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


class FlowMatchingProcess(NoiseProcess):
    """Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023; SD3's convention, as in diffusers):

        x_t = (1 - t) x + t eps,   t in (0, 1),   t = 1 is pure noise,

    a Gaussian process z = s(t) (x + sigma(t) eps) with s(t) = 1 - t and sigma(t) = t / (1 - t), so Algorithm 2
    serves it unchanged: E[x | x_t] is the VE posterior mean at the query x_t / (1 - t) and noise level
    t / (1 - t) (:meth:`NoiseProcess.posterior_mean`). The marginal velocity of the probability-flow ODE
    dx_t / dt = v(x_t, t) is

        v(x_t, t) = E[eps - x | x_t] = (x_t - E[x | x_t]) / t,

    and the conditional velocity eps - x (flow matching's regression target) is its single-sample estimate.
    """

    def sigma(self, t):
        t = torch.as_tensor(t)
        return t / (1 - t)

    def scale(self, t):
        return 1 - torch.as_tensor(t)

    def add_noise(self, x: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x + t eps [B, ...] for x, eps [B, ...] and t scalar or [B] (the path itself, not the
        equal s(t) (x + sigma(t) eps), whose rounding differs)."""
        t = _as_batch(t, x.shape[0], x).reshape((-1,) + (1,) * (x.ndim - 1))
        return (1 - t) * x + t * noise

    def velocity(self, estimator, z: torch.Tensor, t, **kwargs) -> torch.Tensor:
        """The marginal velocity estimate (z - E[x | z, t]) / t [B, ...] for x_t = z, t in (0, 1) scalar or [B]."""
        t = _as_batch(t, z.shape[0], z)
        x_hat = self.posterior_mean(estimator, z, t, **kwargs)
        return (z - x_hat) / t.reshape((-1,) + (1,) * (z.ndim - 1))
