"""Section 6's samplers: hybrid estimator-then-network PF-ODE integration and its forward-process baseline.

Hybrid (Section 6): integrate the PF-ODE with an estimator (KNN, STF, exact) from sigma_max down to
t_switch, then finish with a network. The paper writes time t with sigma(t) = t (Eq. 3), so t_switch is a
noise level. Definition used here: t_switch is inserted into the Karras schedule (when it lies strictly
between two of its levels), so no step straddles it; a step whose starting sigma is > t_switch uses the
estimator for both of its evaluations (Heun's correction included), every other step the network.
Consequences: t_switch >= sigma_max is exactly network sampling, t_switch = 0 exactly estimator sampling,
and an inserted t_switch adds one step (two denoiser calls) to the num_steps of the Karras schedule.

Forward-process baseline (Section 6, Figure 5): start at z = x + t_switch eps with x drawn from the
training data, i.e. an exact sample of p_{t_switch} (Eq. 1), and integrate the network from t_switch to 0
over the same schedule tail as the hybrid sampler uses below t_switch.
"""

from __future__ import annotations

import math
import numbers

import torch

from knn_cm.diffusion import karras_sigmas
from knn_cm.sampling.ode import Denoiser, check_noise, estimator_denoiser, solve_pf_ode
from knn_cm.settings import positive_int


def _check_t_switch(t_switch) -> float:
    if isinstance(t_switch, bool) or not isinstance(t_switch, numbers.Real) or not t_switch >= 0:
        raise ValueError(f"t_switch must be a number >= 0 (a noise level; inf means network only), got {t_switch!r}")
    return float(t_switch)


def switch_schedule(sigmas: torch.Tensor, t_switch: float) -> torch.Tensor:
    """The descending schedule ``sigmas`` [S + 1] with t_switch inserted when it lies strictly between
    sigmas[-1] and sigmas[0] and is not already one of its levels; unchanged otherwise."""
    inside = float(sigmas[-1]) < t_switch < float(sigmas[0])
    if not inside or bool((sigmas == t_switch).any()):
        return sigmas
    position = int((sigmas > t_switch).sum())
    level = sigmas.new_full((1,), t_switch)
    return torch.cat([sigmas[:position], level, sigmas[position:]])


def tail_schedule(sigmas: torch.Tensor, t_switch: float) -> torch.Tensor:
    """[t_switch, then every level of ``sigmas`` below t_switch]; for t_switch < sigmas[0] this is the
    network's part of the hybrid schedule (``switch_schedule(sigmas, t_switch)`` from t_switch on)."""
    below = sigmas[sigmas < t_switch]
    return torch.cat([sigmas.new_full((1,), t_switch), below])


@torch.no_grad()
def hybrid_sample(estimator, network: Denoiser, noise: torch.Tensor, t_switch: float, num_steps: int = 18,
                  sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  generator: torch.Generator | None = None, return_trajectory: bool = False):
    """Heun PF-ODE sampling with ``estimator`` above t_switch and ``network`` below (Section 6).

    Args:
        estimator: a posterior-mean estimator (``knn_cm.estimators``) or any denoiser D(z, sigma).
        network: a denoiser D(z [B, C, H, W], sigma [B]) -> x_hat, e.g. ``EDMPrecond``.
        noise: standard normal [B, C, H, W]; sampling starts at noise * sigma_max.
        t_switch: noise level >= 0 where the network takes over (see the module docstring for the exact
            rule); >= sigma_max gives ``heun_sample(network, noise, ...)`` and 0 gives
            ``heun_sample(estimator, noise, ...)``, bit for bit.
        num_steps, sigma_min, sigma_max, rho: the Karras schedule before t_switch is inserted.
        generator: when given, forwarded to every estimator call (``estimator_denoiser``), so KNN / STF
            draws are reproducible; the estimator must then accept ``generator=``.
        return_trajectory: also return the states after every step [S + 1, B, C, H, W].

    Returns:
        float32 samples [B, C, H, W] (and the trajectory when asked).
    """
    check_noise(noise)
    t_switch = _check_t_switch(t_switch)
    for name, denoiser in (("estimator", estimator), ("network", network)):
        if not callable(denoiser):
            raise ValueError(f"{name} must be callable as D(z, sigma), got {type(denoiser).__name__}")
    sigmas = switch_schedule(karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=noise.device), t_switch)
    estimator_fn = estimator if generator is None else estimator_denoiser(estimator, generator)
    # The estimator serves a step exactly when the step starts above t_switch.
    uses_estimator = (sigmas[:-1] > t_switch).tolist()

    def denoiser_for_step(step: int) -> Denoiser:
        return estimator_fn if uses_estimator[step] else network

    start = noise.to(torch.float64) * sigmas[0]
    return solve_pf_ode(denoiser_for_step, start, sigmas, True, return_trajectory=return_trajectory)


@torch.no_grad()
def forward_process_sample(store, network: Denoiser, t_switch: float, num_samples: int, num_steps: int = 18,
                           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                           generator: torch.Generator | None = None, device: str | torch.device | None = None,
                           return_indices: bool = False):
    """Section 6's baseline: z = x + t_switch eps with x uniform over the training data, then Heun with
    the network from t_switch to 0.

    The network's schedule is [t_switch, every Karras level below t_switch] (ending in 0, Euler on the
    last step): exactly the hybrid sampler's schedule below t_switch, so the two differ only in how the
    state at t_switch was obtained. t_switch = 0 returns the training images themselves (no steps).

    Args:
        store: a ``DataStore``; images are read with ``store.float(indices)`` in [-1, 1].
        network: a denoiser D(z [B, C, H, W], sigma [B]) -> x_hat, e.g. ``EDMPrecond``.
        t_switch: noise level >= 0 of the forward-process sample.
        num_samples: how many samples (all in one batch; call repeatedly for more).
        num_steps, sigma_min, sigma_max, rho: the Karras schedule whose tail is used.
        generator: draws the data indices (uniform, with replacement) and then eps, in that order.
        device: where z lives and the network runs (default: the generator's device, else CPU).
        return_indices: also return the drawn data indices [num_samples] (int64, CPU).

    Returns:
        float32 samples [num_samples, C, H, W] (and the indices when asked).
    """
    t_switch = _check_t_switch(t_switch)
    if not math.isfinite(t_switch):
        raise ValueError(f"t_switch must be finite for forward-process sampling, got {t_switch!r}")
    num_samples = positive_int(num_samples, "num_samples")
    if not callable(network):
        raise ValueError(f"network must be callable as D(z, sigma), got {type(network).__name__}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    sigmas = tail_schedule(karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device), t_switch)

    indices = torch.randint(len(store), (num_samples,), generator=generator, device=device).cpu()
    x = store.float(indices).to(device)
    if t_switch == 0:  # p_0 is the data itself: nothing to integrate
        samples = x
    else:
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        start = x.to(torch.float64) + t_switch * eps.to(torch.float64)
        samples = solve_pf_ode(lambda step: network, start, sigmas, True)
    return (samples, indices) if return_indices else samples
