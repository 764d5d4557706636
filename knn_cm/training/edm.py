"""EDM denoising score matching (Karras et al. 2022) with the estimator's posterior mean as target (App. D.4).

The standard loss regresses D(x + n, sigma) onto the clean source x, the single-sample estimate of
E[x | z, sigma] (Eq. 6); here the target is any estimator's estimate: single (EDM), stf (STF), knn (ours).
ln sigma ~ N(P_mean, P_std^2), weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (docs/hyperparameters.md#edm).

With ``augment`` (EDM's CIFAR-10 recipe: p 0.12, 9 labels), the sources are augmented first, the network
gets the augmentation labels (``augment_dim``), and the target is the estimator's estimate of the posterior
mean over the augmented distribution (each estimator's ``augmented_target``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knn_cm.training.augment import AugmentPipe
from knn_cm.training.objective import Objective, StepRandom, unwrapped
from knn_cm.training.stage_timer import StageTimer

# Distinguishes the augmentation's stream from the dropout masks drawn under the same micro-step seed.
_AUGMENT_STREAM = 0x5DEECE66D


@dataclass
class EDMObjective(Objective):
    """EDM's loss: mean over the batch of lambda(sigma) ||D(x + sigma eps, sigma) - target||^2 (pixel sum).

    Attributes:
        estimator: the regression target's estimator (single -> target = x, EDM's own loss).
        p_mean, p_std: lognormal noise-level distribution (EDM: -1.2, 1.2).
        sigma_data: sd in the weighting (0.5).
        augment: an :class:`~knn_cm.training.augment.AugmentPipe` (or its keyword arguments), or None for
            no augmentation; the network's ``augment_dim`` must equal the pipe's ``label_dim``.
    """

    estimator: object
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    augment: AugmentPipe | dict | None = None

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentPipe(**self.augment)
        if self.augment is not None and not isinstance(self.augment, AugmentPipe):
            raise ValueError(f"trainer.objective.augment must be an AugmentPipe, its settings or null, got "
                             f"{type(self.augment).__name__}")
        self._checked_network = False

    def _check_network(self, network) -> None:
        """The network must take exactly the pipe's labels (checked once, on the unwrapped network)."""
        if self._checked_network:
            return
        inner = getattr(network, "model", network)
        augment_dim = getattr(inner, "augment_dim", 0) or 0
        if augment_dim != self.augment.label_dim:
            raise ValueError(f"trainer.objective.augment ({self.augment!r}) makes {self.augment.label_dim} labels but "
                             f"the network has augment_dim={augment_dim}: set "
                             f"model.network.augment_dim={self.augment.label_dim}")
        self._checked_network = True

    def __call__(self, net, x: torch.Tensor, step: int, random: StepRandom) -> tuple[torch.Tensor, dict]:
        """Loss (scalar) and statistics for clean images x [B, C, H, W].

        The augmentation's per-image draws are made on the host from a generator seeded with ``random.seed``
        (nothing to checkpoint, nothing read from the device).
        """
        batch = x.shape[0]
        noise_generator = random.noise
        augmentation = None
        if self.augment is not None:
            self._check_network(unwrapped(net))
            x, augmentation = self.augment.augment(x, torch.Generator().manual_seed(random.seed ^ _AUGMENT_STREAM))
        # Drawn on the generator's device (the GPU's own generator in training: no host-to-device copy).
        draw_device = noise_generator.device
        sigma = (torch.randn(batch, generator=noise_generator, device=draw_device) * self.p_std + self.p_mean).exp()
        sigma = sigma.to(x.device)
        noise = torch.randn(x.shape, generator=noise_generator, device=draw_device).to(x.device)
        z = x + sigma.reshape(-1, 1, 1, 1) * noise
        stats = {}
        with StageTimer(x.device) as estimator_time:
            if augmentation is None:
                target = self.estimator(z, sigma, x=x, generator=random.estimator)
            else:
                target, stats = self.estimator.augmented_target(self.augment, augmentation, z, sigma, x,
                                                                generator=random.estimator, host_seed=random.seed)
        weight = (sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square()
        labels = {"augment_labels": augmentation.labels} if augmentation is not None else \
            self._unaugmented_labels(unwrapped(net), batch, z.device)
        per_sample = (net(z, sigma, **labels) - target).square().flatten(1).sum(dim=1)
        loss = (weight * per_sample).mean()
        return loss, {"estimator_seconds": estimator_time, **stats}

    @staticmethod
    def _unaugmented_labels(network, batch: int, device: torch.device) -> dict:
        """Zero labels ("not augmented") for a network with ``augment_dim`` > 0 trained without the pipe.

        Its augmentation weights then take part in every step (with zero gradient), as under the pipe; left
        out, they would get no gradient at all, which DDP refuses ("Expected to have finished reduction").
        """
        augment_dim = getattr(getattr(network, "model", network), "augment_dim", 0) or 0
        return {"augment_labels": torch.zeros(batch, augment_dim, device=device)} if augment_dim else {}

    def samplers(self) -> dict:
        """Sample-grid sampler for a trained denoiser: EDM's Heun sampler, 18 steps (35 evaluations)."""
        from knn_cm.sampling import heun_sample

        return {"heun18": lambda model, noise, generator: heun_sample(model, noise, num_steps=18)}
