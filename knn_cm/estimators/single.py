"""The single-sample estimator: the clean source x itself (diffusion and consistency training)."""

from __future__ import annotations

from knn_cm.estimators.base import Estimator


class SingleSample(Estimator):
    """x_hat = x: one draw from the joint p(z, x), unbiased for E[x | z] (Eq. 9 with n = 1).

    Needs no store; with it, z's shape is checked against the data.
    """

    name = "single"
    uses_rows = False
    needs_source = True

    def posterior_mean(self, z, sigma, x, generator):
        return x.clone()

    def repeated_posterior_mean(self, z, sigma, x, repeats, generator):
        return x.unsqueeze(0).expand(repeats, *x.shape).clone()
