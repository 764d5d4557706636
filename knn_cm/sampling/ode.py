"""Probability-flow ODE samplers of EDM (Karras et al. 2022, Algorithm 2): Heun, Euler, optional churn.

The VE PF-ODE (paper Eq. 3 with Eq. 5) in EDM's form is dz/dsigma = (z - D(z, sigma)) / sigma, where
D(z, sigma) = E[x | z, sigma] is any posterior-mean estimate: a network (``EDMPrecond``), an estimator
from ``knn_cm.estimators`` (exact, KNN, STF, ...) or a mixture of both (``knn_cm.sampling.hybrid``).
As in EDM's ``edm_sampler`` the ODE state is float64, the denoiser sees float32 inputs, and the last
step to sigma = 0 is an Euler step (the 2nd-order correction would evaluate D at sigma = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise

import torch

from knn_cm.diffusion import karras_sigmas, pf_ode_step

# D(z [B, C, H, W] float32, sigma [B] float32) -> x_hat [B, C, H, W]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ checks
def check_noise(noise) -> None:
    """Raise ValueError unless ``noise`` is a floating tensor [B, C, H, W] with B >= 1."""
    if not isinstance(noise, torch.Tensor):
        raise ValueError(f"noise must be a torch.Tensor [B, C, H, W], got {type(noise).__name__}")
    if noise.ndim != 4 or noise.shape[0] < 1:
        raise ValueError(f"noise must be 4-D [B, C, H, W] with B >= 1, got shape {tuple(noise.shape)}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor (standard normal), got dtype {noise.dtype}")


def check_sigmas(sigmas, device: torch.device) -> torch.Tensor:
    """An explicit sampling schedule as a float64 tensor [S + 1] on ``device``.

    It must be 1-D with at least two entries (one step), finite, strictly descending, start above 0 and
    end at or above 0; only the last entry may be 0 (strictly descending and >= 0 imply this).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().to(device)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or float(sigmas[-1]) < 0:
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}")
    return sigmas


def sampling_schedule(device: torch.device, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                      sigmas=None) -> torch.Tensor:
    """``sigmas`` checked (when given) or the Karras schedule [num_steps + 1] ending in 0, float64."""
    if sigmas is not None:
        return check_sigmas(sigmas, device)
    return karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)


def _check_churn(s_churn: float, s_min: float, s_max: float, s_noise: float) -> None:
    if not (math.isfinite(s_churn) and s_churn >= 0):
        raise ValueError(f"s_churn must be finite and >= 0, got {s_churn!r}")
    if not (s_min <= s_max):
        raise ValueError(f"s_min must be <= s_max, got s_min={s_min!r}, s_max={s_max!r}")
    if not (math.isfinite(s_noise) and s_noise >= 0):
        raise ValueError(f"s_noise must be finite and >= 0, got {s_noise!r}")


# ------------------------------------------------------------------------------------------ solver
def denoise(denoiser: Denoiser, z: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """D(z, sigma) in float64 for a float64 state z [B, C, H, W] and one noise level (0-dim tensor or float).

    The denoiser (network, estimator or consistency function) gets float32 z and a float32 sigma [B].
    """
    batch = z.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=z.device)
    x_hat = denoiser(z.to(torch.float32), sigma.to(torch.float32).reshape(1).expand(batch))
    if not isinstance(x_hat, torch.Tensor) or x_hat.shape != z.shape:
        shape = tuple(x_hat.shape) if isinstance(x_hat, torch.Tensor) else type(x_hat).__name__
        raise ValueError(f"the denoiser must return a tensor of z's shape {tuple(z.shape)}, got {shape}")
    return x_hat.to(torch.float64)


def _add_churn(x: torch.Tensor, sigma: torch.Tensor, gamma: float, s_noise: float,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's temporary noise increase: sigma_hat = (1 + gamma) sigma and x + sqrt(sigma_hat^2 - sigma^2) s_noise eps.

    Returns (x_hat [B, C, H, W] float64, sigma_hat 0-dim); with gamma = 0 nothing is drawn.
    """
    sigma_hat = sigma + gamma * sigma
    if gamma == 0:
        return x, sigma_hat
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps, sigma_hat


def solve_pf_ode(denoiser_for_step: Callable[[int], Denoiser], start: torch.Tensor, sigmas: torch.Tensor,
                 second_order: bool, churn: tuple[float, float, float, float] = (0.0, 0.0, math.inf, 1.0),
                 generator: torch.Generator | None = None, return_trajectory: bool = False):
    """Integrate the PF-ODE from ``start`` at sigmas[0] through the schedule ``sigmas`` [S + 1].

    EDM's ``edm_sampler`` loop: step i goes from sigmas[i] to sigmas[i + 1] using ``denoiser_for_step(i)``
    for both of its evaluations; the 2nd-order (Heun) correction runs whenever sigmas[i + 1] > 0.

    Args:
        start: float64 state [B, C, H, W] at noise level sigmas[0].
        churn: (s_churn, s_min, s_max, s_noise). While s_min <= sigma_i <= s_max a step first raises the
            noise to sigma_hat = (1 + gamma) sigma_i, gamma = min(s_churn / S, sqrt(2) - 1), adding
            sqrt(sigma_hat^2 - sigma_i^2) s_noise eps with eps drawn (float64) from ``generator``.
            No noise is drawn while gamma = 0, so deterministic sampling never touches the generator.

    Returns:
        float32 x [B, C, H, W], or (x, trajectory [S + 1, B, C, H, W] float32, the state after each step,
        starting with ``start``) when ``return_trajectory``.
    """
    s_churn, s_min, s_max, s_noise = churn
    num_steps = sigmas.numel() - 1
    levels = sigmas.tolist()  # host copies for the branches (no device sync per step)
    x_next = start
    trajectory = [x_next.to(torch.float32)] if return_trajectory else None
    for i, (sigma_cur, sigma_next) in enumerate(pairwise(sigmas)):
        denoiser = denoiser_for_step(i)
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_min <= levels[i] <= s_max else 0.0
        x_hat, sigma_hat = _add_churn(x_next, sigma_cur, gamma, s_noise, generator)
        solver = "heun" if second_order and levels[i + 1] > 0 else "euler"
        x_next = pf_ode_step(partial(denoise, denoiser), x_hat, sigma_hat, sigma_next, solver)
        if return_trajectory:
            trajectory.append(x_next.to(torch.float32))
    x_final = x_next.to(torch.float32)
    return (x_final, torch.stack(trajectory)) if return_trajectory else x_final


# ---------------------------------------------------------------------------------------- samplers
def _sample(denoiser: Denoiser, noise: torch.Tensor, second_order: bool, num_steps: int, sigma_min: float,
            sigma_max: float, rho: float, s_churn: float, s_min: float, s_max: float, s_noise: float,
            generator: torch.Generator | None, sigmas, return_trajectory: bool):
    check_noise(noise)
    if not callable(denoiser):
        raise ValueError(f"denoiser must be callable as D(z, sigma), got {type(denoiser).__name__}")
    _check_churn(s_churn, s_min, s_max, s_noise)
    schedule = sampling_schedule(noise.device, num_steps, sigma_min, sigma_max, rho, sigmas)
    start = noise.to(torch.float64) * schedule[0]  # z_T ~ N(0, sigma_max^2 I), the prior pi(z)
    return solve_pf_ode(lambda step: denoiser, start, schedule, second_order, (s_churn, s_min, s_max, s_noise),
                        generator, return_trajectory)


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, s_churn: float = 0.0, s_min: float = 0.0,
                s_max: float = math.inf, s_noise: float = 1.0, generator: torch.Generator | None = None,
                sigmas: Sequence[float] | torch.Tensor | None = None, return_trajectory: bool = False):
    """EDM's 2nd-order sampler (Karras et al. 2022, Algorithm 2): 2 S - 1 denoiser calls for S steps.

    Args:
        denoiser: D(z [B, C, H, W] float32, sigma [B] float32) -> x_hat [B, C, H, W]; an ``EDMPrecond``, any
            ``knn_cm.estimators`` estimator, or ``estimator_denoiser(est, generator)`` for seeded draws.
        noise: standard normal [B, C, H, W] (e.g. ``noise_for_seeds``); sampling starts at noise * sigmas[0].
        num_steps, sigma_min, sigma_max, rho: the Karras schedule (``karras_sigmas``), ignored when
            ``sigmas`` is given. EDM CIFAR-10: 18 steps (35 evaluations), 0.002, 80, 7.
        s_churn, s_min, s_max, s_noise: EDM's stochasticity (0 = deterministic ODE; see ``solve_pf_ode``).
        generator: torch.Generator on noise's device for the churn noise.
        sigmas: an explicit strictly descending schedule [S + 1]; ending in 0 makes the last step Euler,
            ending above 0 returns the state at that noise level.
        return_trajectory: also return the states after every step [S + 1, B, C, H, W].

    Returns:
        float32 samples [B, C, H, W] (and the trajectory when asked).
    """
    return _sample(denoiser, noise, True, num_steps, sigma_min, sigma_max, rho, s_churn, s_min, s_max, s_noise,
                   generator, sigmas, return_trajectory)


@torch.no_grad()
def euler_sample(denoiser: Denoiser, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, s_churn: float = 0.0, s_min: float = 0.0,
                 s_max: float = math.inf, s_noise: float = 1.0, generator: torch.Generator | None = None,
                 sigmas: Sequence[float] | torch.Tensor | None = None, return_trajectory: bool = False):
    """First-order (Euler) version of :func:`heun_sample`: S denoiser calls for S steps, same arguments."""
    return _sample(denoiser, noise, False, num_steps, sigma_min, sigma_max, rho, s_churn, s_min, s_max, s_noise,
                   generator, sigmas, return_trajectory)


def estimator_denoiser(estimator, generator: torch.Generator | None = None) -> Denoiser:
    """D(z, sigma) = estimator(z, sigma, generator=generator): an estimator with reproducible draws.

    KNN, STF and posterior-MC estimates are random; forwarding one torch.Generator (on the estimator's
    device) to every call makes a whole PF-ODE integration reproducible from its seed.
    """
    if not callable(estimator):
        raise ValueError(f"estimator must be callable as est(z, sigma, generator=...), got {type(estimator).__name__}")

    def denoiser(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return estimator(z, sigma, generator=generator)

    return denoiser
