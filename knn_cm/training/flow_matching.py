"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) with an estimator's posterior mean in its target.

Convention (SD3, diffusers; ``knn_cm.diffusion.FlowMatchingProcess``): x_t = (1 - t) x + t eps, t in (0, 1),
t = 1 is noise; s(t) = 1 - t, sigma(t) = t / (1 - t). The network v(x_t, t) regresses the marginal velocity

    v(x_t, t) = E[eps - x | x_t] = (x_t - E[x | x_t]) / t.

Standard flow matching uses the conditional velocity eps - x, a single-sample estimate of it. Here the target is

    target = (x_t - x_hat) / t,   x_hat = the configured estimator's E[x | x_t] (Algorithm 2: the VE query
                                  x_t / (1 - t) at noise level t / (1 - t)),

computed as (eps - x) + (x - x_hat) / t, equal in exact arithmetic; written so, the single-sample estimator
(x_hat = x) gives exactly eps - x, flow matching's own loss, bit for bit. STF and KNN give lower-variance
targets (the paper's estimators, Sections 4-5).

Time sampling: ``logit_normal`` (t = sigmoid(n), n ~ N(m, s^2); SD3's default m 0, s 1, Esser et al. 2024) or
``uniform`` (Lipman et al. 2023, Tong et al. 2023). Draws are kept in [t_min, t_max] inside (0, 1): the target
divides by t and the estimator's noise level t / (1 - t) must be finite.

Loss: mean over the batch and the pixels of w(t) (v_theta(x_t, t) - target)^2 (per-pixel mean, as Lipman et al.
and Tong et al.; the scale matters with gradient clipping). Weighting ``uniform`` (w = 1: the rectified-flow /
conditional flow-matching loss) or ``edm`` (w = 1 / c_out(t)^2 = ((1 - t)^2 sd^2 + t^2) / sd^2: with
``FMPrecond`` the raw network's effective weight is then 1 at every t, EDM's principle, Karras et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from knn_cm.diffusion import FlowMatchingProcess
from knn_cm.training.objective import Objective, StepRandom
from knn_cm.training.stage_timer import StageTimer

TIME_SAMPLINGS = ("logit_normal", "uniform")
WEIGHTINGS = ("uniform", "edm")


def flow_matching_target(process: FlowMatchingProcess, estimator, x_t: torch.Tensor, t: torch.Tensor,
                         x: torch.Tensor, noise: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The velocity target (x_t - x_hat) / t [B, C, H, W], written (eps - x) + (x - x_hat) / t.

    x_t = (1 - t) x + t eps [B, C, H, W] from sources x and noise eps; t [B] in (0, 1); x_hat is ``estimator``'s
    posterior mean through ``process`` (Algorithm 2), given the sources (single-sample and STF use them) and
    ``generator`` for its draws. With ``single`` (x_hat = x) the result is exactly eps - x.
    """
    x_hat = process.posterior_mean(estimator, x_t, t, x=x, generator=generator)
    return (noise - x) + (x - x_hat) / t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class FlowMatchingObjective(Objective):
    """The flow-matching loss with an estimator-driven target (module docstring).

    Attributes:
        estimator: the target's estimator (single -> flow matching's own eps - x; stf; knn).
        time_sampling: "logit_normal" (SD3) or "uniform".
        logit_mean, logit_std: the logit-normal's m and s (SD3: 0, 1).
        t_min, t_max: draws are kept in [t_min, t_max] (uniform: mapped affinely; logit-normal: clamped).
        weighting: "uniform" (w = 1) or "edm" (w = 1 / c_out(t)^2 with ``sigma_data``).
        sigma_data: sd of the "edm" weighting (match the network's ``FMPrecond`` sigma_data).
        sample_steps: Euler and Heun steps of the sample grids written during training.
    """

    estimator: object
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_min: float = 1e-5
    t_max: float = 1 - 1e-5
    weighting: str = "uniform"
    sigma_data: float = 0.5
    sample_steps: int = 16

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"trainer.objective.time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, got "
                             f"{self.time_sampling!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"trainer.objective.weighting must be one of {', '.join(WEIGHTINGS)}, got "
                             f"{self.weighting!r}")
        if not (0 < self.t_min < self.t_max < 1):
            raise ValueError(f"trainer.objective.t_min and t_max must satisfy 0 < t_min < t_max < 1 (the target "
                             f"divides by t, the noise level t / (1 - t) must be finite), got {self.t_min}, "
                             f"{self.t_max}")
        if not (math.isfinite(self.logit_mean) and math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError(f"trainer.objective.logit_mean must be finite and logit_std finite and > 0, got "
                             f"{self.logit_mean}, {self.logit_std}")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"trainer.objective.sigma_data must be finite and > 0, got {self.sigma_data}")
        if isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise ValueError(f"trainer.objective.sample_steps must be an integer >= 1, got {self.sample_steps!r}")
        self.process = FlowMatchingProcess()

    def sample_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """t [B] float32 on the generator's device, in [t_min, t_max]."""
        device = generator.device
        if self.time_sampling == "uniform":
            u = torch.rand(batch, generator=generator, device=device)
            return self.t_min + (self.t_max - self.t_min) * u
        n = torch.randn(batch, generator=generator, device=device) * self.logit_std + self.logit_mean
        return torch.sigmoid(n).clamp(self.t_min, self.t_max)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) [B] (module docstring)."""
        if self.weighting == "uniform":
            return torch.ones_like(t)
        return ((1 - t).square() * self.sigma_data**2 + t.square()) / self.sigma_data**2

    def __call__(self, net, x: torch.Tensor, step: int, random: StepRandom) -> tuple[torch.Tensor, dict]:
        """Loss (scalar) and statistics for clean images x [B, C, H, W].

        Random numbers (t, then eps) come from ``random.noise`` on its own device and move to x's (a no-op when
        the generator lives there); nothing is read back to the host.
        """
        batch = x.shape[0]
        t = self.sample_times(batch, random.noise).to(x.device)
        noise = torch.randn(x.shape, generator=random.noise, device=random.noise.device).to(x.device)
        x_t = self.process.add_noise(x, t, noise)
        with StageTimer(x.device) as estimator_time:
            target = flow_matching_target(self.process, self.estimator, x_t, t, x, noise, random.estimator)
        per_sample = (net(x_t, t) - target).square().flatten(1).mean(dim=1)
        loss = (self.weight(t) * per_sample).mean()
        return loss, {"estimator_seconds": estimator_time}

    def samplers(self) -> dict:
        """Sample-grid samplers for a trained velocity network: Euler and Heun with ``sample_steps`` steps each."""
        from knn_cm.sampling.flow import flow_sample

        steps = self.sample_steps
        return {f"euler{steps}": lambda model, noise, generator: flow_sample(model, noise, steps, solver="euler"),
                f"heun{steps}": lambda model, noise, generator: flow_sample(model, noise, steps, solver="heun")}
