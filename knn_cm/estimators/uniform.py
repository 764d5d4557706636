"""SNIS with the uniform proposal, mu_U of Theorem 4.2."""

from __future__ import annotations

import torch

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.distances import reference_log_likelihoods
from knn_cm.estimators.draws import draw_uniform_rows
from knn_cm.estimators.registry import register_estimator
from knn_cm.settings import positive_int


@register_estimator("uniform")
class UniformSNIS(Estimator):
    """Eq. 11 with q = 1/N: n uniform draws, weights proportional to p(z | x_j).

    The n draws of one call are shared by all its queries (each query's estimate has the estimator's
    own distribution; estimates within one call are correlated), so distances and the weighted sum
    are two matrix products.
    """


    def __init__(self, store, n: int = 256, **kwargs):
        super().__init__(store, **kwargs)
        self.n = positive_int(n, "n")

    def posterior_mean(self, z, sigma, x, generator):
        reference = draw_uniform_rows(self.rows, self.n, generator, self.sync_free)
        weights = torch.softmax(reference_log_likelihoods(z, sigma, reference, fixed_shapes=self.sync_free), dim=1)
        return weights @ reference
