"""The training objective: what the Trainer calls once per micro-step, and the samplers of its sample grids.

An objective turns a batch of clean images into a loss. The Trainer owns everything else (data order, the
optimizer, DDP, the EMA, checkpoints) and hands each call the network and the micro-step's random streams::

    import torch
    from knn_cm.estimators import make_estimator
    from knn_cm.training.objective import Objective, StepRandom

    class DenoisingAtOneSigma(Objective):
        '''D(x + sigma eps, sigma) regressed onto the estimator's posterior mean, at one noise level.'''

        def __init__(self, estimator, sigma: float = 1.0):
            self.estimator, self.sigma = estimator, sigma

        def __call__(self, net, x, step, random):                    # x: clean images [B, C, H, W]
            sigma = torch.full((x.shape[0],), self.sigma, device=x.device)
            noise = torch.randn(x.shape, generator=random.noise, device=random.noise.device).to(x.device)
            z = x + sigma.reshape(-1, 1, 1, 1) * noise
            target = self.estimator(z, sigma, x=x, generator=random.estimator)
            loss = (net(z, sigma) - target).square().flatten(1).sum(1).mean()
            return loss, {}                                           # loss: a scalar tensor

    objective = DenoisingAtOneSigma(make_estimator("knn", store, index=index, k=256, n=64))
    loss, stats = objective(network, x, 0, StepRandom.seeded(0))     # alone; the Trainer calls it the same way

``stats`` maps names to device tensors or numbers, logged (averaged over a window) beside the loss; a tensor is
read back only on steps that log. Every draw comes from ``random``: the run then continues bit for bit after a
restart and ranks draw differently.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from knn_cm.device import new_generator


@dataclass(frozen=True)
class StepRandom:
    """The random streams of one micro-step.

    Attributes:
        noise: the objective's own draws (noise levels, noise, times), on the training device under CUDA.
        estimator: the estimator's draws, on the estimator's device.
        seed: this micro-step's seed (per run seed, rank, step and micro-step). The Trainer draws every dropout
            mask of the call from it (``knn_cm.models.dropout.shared_dropout(seed)``); an objective re-enters
            ``shared_dropout(seed)`` to replay those masks (iCT's teacher) and seeds draws it makes on the host
            from it (EDM's augmentation), so they need no generator state in checkpoints.
    """

    noise: torch.Generator
    estimator: torch.Generator
    seed: int

    @classmethod
    def seeded(cls, seed: int, device: torch.device | str = "cpu",
               estimator_device: torch.device | str | None = None) -> StepRandom:
        """Streams for calling an objective alone: generators on ``device`` (and ``estimator_device``, default
        ``device``) seeded from ``seed``, and ``seed`` itself."""
        return cls(new_generator(device, seed), new_generator(estimator_device or device, seed + 1), int(seed))


class Objective(abc.ABC):
    """A training objective: ``loss, stats = objective(net, x, step, random)``; ``samplers()`` for grids."""

    @abc.abstractmethod
    def __call__(self, net, x: torch.Tensor, step: int, random: StepRandom) -> tuple[torch.Tensor, dict]:
        """The loss (a scalar tensor with gradient) and statistics for clean images x [B, C, H, W].

        Args:
            net: the trained network as the Trainer runs it (wrapped by DDP under data parallelism; use
                :func:`unwrapped` for a pass that must not synchronise gradients, such as iCT's teacher).
            x: clean images [B, C, H, W] on the training device, in [-1, 1].
            step: the optimizer step (schedules such as iCT's curriculum follow it).
            random: the micro-step's random streams.
        """

    def samplers(self) -> dict:
        """name -> sampler(model, noise [B, C, H, W], generator) -> images, for the Trainer's sample grids."""
        return {}


def unwrapped(net):
    """The network inside a DDP wrapper (or ``net`` itself): same weights, no gradient synchronisation."""
    return getattr(net, "module", net)
