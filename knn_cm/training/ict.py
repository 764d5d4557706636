"""Improved consistency training (iCT, Song & Dhariwal 2024) with a pluggable score estimator (Section 5).

The consistency loss (Eq. 7) compares the student f(z_{i+1}, sigma_{i+1}) with the stop-gradient teacher
f(z_i, sigma_i), where z_i comes from one step of the PF-ODE (Eq. 3) from sigma_{i+1} down to sigma_i using
the configured estimator's score (Eq. 5) and solver. With the single-sample estimator and Euler that step
is exactly iCT's z_i = x + sigma_i * eps (Appendix A.5); with KNN or STF and Heun it is the paper's method.
Settings (docs/hyperparameters.md#ict): Karras noise levels with rho 7, exponential discretisation curriculum, discrete
lognormal noise-level sampling, lambda = 1 / (sigma_{i+1} - sigma_i), pseudo-Huber distance, and a
teacher that is the student under stop-gradient with the same dropout masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from knn_cm.device import to_device_async
from knn_cm.diffusion import ODE_SOLVERS, pf_ode_step
from knn_cm.models import shared_dropout
from knn_cm.training.objective import Objective, StepRandom, unwrapped
from knn_cm.training.stage_timer import StageTimer

DISTANCES = ("pseudo_huber", "pseudo_huber_per_element", "l2")


def curriculum_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Discretisation N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)).

    The logarithm is not floored (iCT's formula): with s0 10, s1 1280, K 400,000 it is 7 exactly, so
    K' = 50,000 and N = 11, 21, 41, ..., 1281 (from k = 350,000); with s1 1000, log2 100 = 6.64 and
    K' = floor(52,329.6) = 52,329 (flooring the logarithm would give 57,142).
    """
    if s0 < 1 or s1 < s0:
        raise ValueError(f"the curriculum needs 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    stages = math.log2(math.floor(s1 / s0)) + 1
    steps_per_stage = max(1, math.floor(total_steps / stages))
    return min(s0 * 2 ** (step // steps_per_stage), s1) + 1


def karras_levels(num_levels: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Ascending noise levels sigma_1 < ... < sigma_N [N]:
    sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho."""
    if num_levels < 2:
        raise ValueError(f"need at least 2 noise levels, got {num_levels}")
    ramp = torch.linspace(0, 1, num_levels, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((low + ramp * (high - low)) ** rho).to(dtype)


def level_probabilities(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Discrete lognormal p(i) over i = 1..N-1 [N - 1]: the N(p_mean, p_std^2) mass of ln sigma between
    ln sigma_i and ln sigma_{i+1}, normalised: proportional to erf((ln s_{i+1} - P_mean)/(sqrt 2 P_std)) - erf(...)."""
    cdf = torch.erf((sigmas.to(torch.float64).log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def pseudo_huber(student: torch.Tensor, teacher: torch.Tensor, c: float, per_element: bool = False) -> torch.Tensor:
    """Pseudo-Huber distance per sample [B]: sqrt(||a - b||^2 + c^2) - c over the whole sample, or the mean
    over elements of sqrt((a - b)^2 + c^2) - c (a different loss some reimplementations use)."""
    diff = (student - teacher).flatten(1)
    if per_element:
        return (diff.square() + c * c).sqrt().sub(c).mean(dim=1)
    return (diff.square().sum(dim=1) + c * c).sqrt() - c


@dataclass
class ICTObjective(Objective):
    """The iCT loss with an estimator-driven ODE step.

    Attributes:
        estimator: posterior-mean estimator for the ODE step (single, stf, knn, ...).
        solver: "euler" (iCT) or "heun" (iCT + KNN / STF, Table 3).
        total_steps: K, the run's length, for the curriculum.
        s0, s1: curriculum start and final discretisation (10 and 1280 for CIFAR-10).
        distance: "pseudo_huber" (whole sample, default), "pseudo_huber_per_element" or "l2".
        huber_c: pseudo-Huber c; default 0.00054 sqrt(d) whole-sample (0.0299 on CIFAR-10), 0.03 per element.
    """

    estimator: object
    total_steps: int
    solver: str = "euler"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    distance: str = "pseudo_huber"
    huber_c: float | None = None

    def __post_init__(self):
        if self.solver not in ODE_SOLVERS:
            raise ValueError(f"unknown ODE solver {self.solver!r}; allowed: {', '.join(ODE_SOLVERS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; allowed: {', '.join(DISTANCES)}")
        if not (math.isfinite(self.sigma_min) and 0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"trainer.objective.sigma_min must be > 0 and below sigma_max ({self.sigma_max}), got "
                             f"{self.sigma_min} (Heun's step evaluates the estimator at every level)")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        self._levels: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def levels(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [N] float64, p(i) [N - 1] float64) of the curriculum at ``step`` on ``device``, cached per N
        (computed on the CPU, then copied once without waiting, so every device uses the same levels)."""
        num_levels = curriculum_steps(step, self.total_steps, self.s0, self.s1)
        key = (num_levels, torch.device(device))
        if key not in self._levels:
            sigmas = karras_levels(num_levels, self.sigma_min, self.sigma_max, self.rho)
            probabilities = level_probabilities(sigmas, self.p_mean, self.p_std)
            self._levels[key] = (to_device_async(sigmas, device), to_device_async(probabilities, device))
        return self._levels[key]

    def __call__(self, net, x: torch.Tensor, step: int, random: StepRandom) -> tuple[torch.Tensor, dict]:
        """Loss (scalar, mean over the batch) and statistics for clean images x [B, C, H, W].

        ``net`` is the trained network (possibly DDP-wrapped); the teacher is the same weights without the
        wrapper, run without gradient under the student's dropout masks (``random.seed``).
        """
        noise_generator = random.noise
        sigmas, probabilities = self.levels(step, noise_generator.device)
        batch = x.shape[0]
        index = torch.multinomial(probabilities, batch, replacement=True, generator=noise_generator)
        sigma_low = sigmas[index].to(device=x.device, dtype=torch.float32)
        sigma_high = sigmas[index + 1].to(device=x.device, dtype=torch.float32)
        noise = torch.randn(x.shape, generator=noise_generator, device=noise_generator.device).to(x.device)
        z_high = x + sigma_high.reshape(-1, 1, 1, 1) * noise
        with StageTimer(x.device) as estimator_time:
            z_low = pf_ode_step(self.estimator, z_high, sigma_high, sigma_low, self.solver, x=x,
                                generator=random.estimator)
        with shared_dropout(random.seed):
            student_out = net(z_high, sigma_high)
        with torch.no_grad(), shared_dropout(random.seed):
            teacher_out = unwrapped(net)(z_low, sigma_low)
        dim = x[0].numel()
        if self.distance == "l2":
            distance = (student_out - teacher_out).flatten(1).square().mean(dim=1)
        else:
            per_element = self.distance == "pseudo_huber_per_element"
            c = self.huber_c if self.huber_c is not None else (0.03 if per_element else 0.00054 * math.sqrt(dim))
            distance = pseudo_huber(student_out, teacher_out, c, per_element)
        weight = 1.0 / (sigma_high - sigma_low)
        loss = (weight * distance).mean()
        stats = {"num_levels": len(sigmas), "estimator_seconds": estimator_time,
                 "distance": distance.detach().mean()}  # a device tensor: read back at log steps only
        return loss, stats

    def samplers(self) -> dict:
        """Sample-grid samplers for a trained consistency function: one step from sigma_max, and two steps
        through sigma 0.821 (docs/hyperparameters.md#ict)."""
        from knn_cm.sampling import consistency_sample

        def sampler(sigmas):
            return lambda model, noise, generator: consistency_sample(model, noise, sigmas=sigmas,
                                                                      sigma_min=self.sigma_min, generator=generator)

        return {"onestep": sampler((self.sigma_max,)), "twostep": sampler((self.sigma_max, 0.821))}
