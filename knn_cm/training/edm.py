"""EDM denoising score matching (Karras et al. 2022) with the estimator's posterior mean as target (App. D.4).

The standard loss regresses D(x + n, sigma) onto the clean source x, the single-sample estimate of
E[x | z, sigma] (Eq. 6); here the target is any estimator's estimate: single (EDM), stf (STF), knn (ours).
ln sigma ~ N(P_mean, P_std^2), weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (FACTS.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class EDMObjective:
    """EDM's loss: mean over the batch of lambda(sigma) ||D(x + sigma eps, sigma) - target||^2 (pixel sum).

    Attributes:
        estimator: the regression target's estimator (single -> target = x, EDM's own loss).
        p_mean, p_std: lognormal noise-level distribution (EDM: -1.2, 1.2).
        sigma_data: sd in the weighting (0.5).
    """

    estimator: object
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    def __call__(self, student, teacher, x: torch.Tensor, step: int, noise_generator: torch.Generator,
                 estimator_generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Loss (scalar) and statistics for clean images x [B, C, H, W]; ``teacher`` is unused."""
        batch = x.shape[0]
        sigma = (torch.randn(batch, generator=noise_generator) * self.p_std + self.p_mean).exp().to(x.device)
        noise = torch.randn(x.shape, generator=noise_generator).to(x.device)
        z = x + sigma.reshape(-1, 1, 1, 1) * noise
        started = time.perf_counter()
        target = self.estimator(z, sigma, x=x, generator=estimator_generator)
        estimator_seconds = time.perf_counter() - started
        weight = (sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square()
        per_sample = (student(z, sigma) - target).square().flatten(1).sum(dim=1)
        loss = (weight * per_sample).mean()
        return loss, {"estimator_seconds": estimator_seconds}

    def samplers(self) -> dict:
        """Sample-grid sampler for a trained denoiser: EDM's Heun sampler, 18 steps (35 evaluations)."""
        from knn_cm.sampling import heun_sample

        return {"heun18": lambda model, noise, generator: heun_sample(model, noise, num_steps=18)}
