"""Stable Target Field (Xu et al. 2023): SNIS with uniform draws plus the sample's own source.

Two variants (docs/hyperparameters.md#stf):
- ``per_sample`` (the paper's Section 4.2 baseline): for each z, n - 1 uniform draws plus its own
  source x, weights softmax_j(-||z - y_j||^2 / (2 sigma^2)); the deterministic inclusion of x is not
  corrected for, which is STF's bias.
- ``shared``: one reference batch of n images per call holding every source of the minibatch plus
  n - B uniform draws, shared by all queries (STF's training code).
Without sources (PF-ODE sampling) both reduce to n uniform draws. No clamp is applied.
"""

from __future__ import annotations

import torch

from knn_cm.device import host_generator
from knn_cm.estimators.base import Estimator
from knn_cm.estimators.distances import log_likelihood, reference_log_likelihoods, reference_sq_dists, sq_norms
from knn_cm.estimators.draws import draw_uniform_rows
from knn_cm.estimators.registry import register_estimator
from knn_cm.settings import positive_int

STF_VARIANTS = ("per_sample", "shared")
# Distinguishes the reference batch's augmentation from the other draws made under one training step's seed.
_REFERENCE_AUGMENT_STREAM = 0x2545F4914F6CDD1D


@register_estimator("stf")
class STF(Estimator):
    """STF posterior-mean estimator with reference size n (Xu et al. 2023)."""


    def __init__(self, store, n: int = 256, variant: str = "per_sample", **kwargs):
        super().__init__(store, **kwargs)
        self.n = positive_int(n, "n")
        if variant not in STF_VARIANTS:
            raise ValueError(f"unknown STF variant {variant!r}; allowed: {', '.join(STF_VARIANTS)}")
        self.variant = variant

    def posterior_mean(self, z, sigma, x, generator):
        others = draw_uniform_rows(self.rows, self.other_count(z.shape[0], x is not None), generator, self.sync_free)
        return self.mean_with_sources(z, sigma, x, others)

    def other_count(self, batch: int, with_sources: bool) -> int:
        """Uniform draws a call of ``batch`` queries makes besides the sources: n without sources (PF-ODE
        sampling), n - batch for ``shared`` (which must hold every source), n - 1 for ``per_sample``."""
        if not with_sources:
            return self.n
        if self.variant == "shared":
            if self.n < batch:
                raise ValueError(f"shared STF needs n >= batch size ({batch}) to hold every source, got n={self.n}")
            return self.n - batch
        return self.n - 1

    def mean_with_sources(self, z: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor | None,
                          others: torch.Tensor) -> torch.Tensor:
        """STF's self-normalised average [B, d] over the reference batch: the uniform draws ``others`` [m, d]
        (m = :meth:`other_count`) and, where given, the sources x [B, d] (per variant, as the module says)."""
        if x is None:
            return torch.softmax(reference_log_likelihoods(z, sigma, others, self.sync_free), dim=1) @ others
        if self.variant == "shared":
            reference = torch.cat([x, others])
            return torch.softmax(reference_log_likelihoods(z, sigma, reference, self.sync_free), dim=1) @ reference
        # per_sample: the draws shared by the call, plus each query's own source as column m.
        source_sq_dist = sq_norms(z - x)
        sq_dists = torch.cat([reference_sq_dists(z, sigma, others, best_known=source_sq_dist,
                                                 fixed_shapes=self.sync_free), source_sq_dist.unsqueeze(1)], dim=1)
        weights = torch.softmax(log_likelihood(sq_dists, sigma), dim=1)
        return weights[:, :-1] @ others + weights[:, -1:] * x

    def augmented_target(self, pipe, augmentation, z, sigma, x_augmented, generator=None, host_seed=None):
        """STF's own recipe under augmentation (its training code augments the whole reference batch): the
        minibatch's augmented sources plus the other reference images, each augmented independently; the
        target is STF's self-normalised average over them, a posterior mean over the augmented empirical
        distribution. The other images' augmentation is drawn on the host from ``generator`` when it is a CPU
        generator, else from one seeded with ``host_seed`` (no device read) or a draw from ``generator``."""
        z_flat, sigma, x_flat = self._validate(z, sigma, x_augmented)
        count = self.other_count(z.shape[0], with_sources=True)
        others = draw_uniform_rows(self.rows, count, generator, self.sync_free)
        if count:
            seed = None if host_seed is None else host_seed ^ _REFERENCE_AUGMENT_STREAM
            others = pipe.augment(others.reshape(count, *z.shape[1:]), host_generator(generator, seed))[0]
            others = others.reshape(count, -1).to(device=self.device, dtype=self.dtype)
        with self._computing():
            out = self.mean_with_sources(z_flat, sigma, x_flat, others)
        return out.reshape(z.shape).to(device=z.device, dtype=z.dtype), {"augment_source_targets": 0.0}
