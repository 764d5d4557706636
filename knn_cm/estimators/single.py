"""The single-sample estimator: the clean source x itself (diffusion and consistency training)."""

from __future__ import annotations

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.registry import register_estimator


@register_estimator("single")
class SingleSample(Estimator):
    """x_hat = x: one draw from the joint p(z, x), unbiased for E[x | z] (Eq. 9 with n = 1).

    Needs no store; with it, z's shape is checked against the data.
    """

    needs_store = False
    uses_rows = False
    needs_source = True

    def posterior_mean(self, z, sigma, x, generator):
        return x.clone()

    def repeated_posterior_mean(self, z, sigma, x, repeats, generator):
        return x.unsqueeze(0).expand(repeats, *x.shape).clone()

    def augmented_target(self, pipe, augmentation, z, sigma, x_augmented, generator=None, host_seed=None):
        """The augmented source T_a x itself: a draw from the augmented posterior (EDM's own target)."""
        return x_augmented.clone(), {"augment_source_targets": 1.0}
