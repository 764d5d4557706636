"""Posterior-mean (score) estimators sharing one contract: ``x_hat = est(z, sigma, x=None, generator=None)``.

    from knn_cm.estimators import make_estimator
    est = make_estimator("knn", store, index=index, k=2048, n=256)
    x_hat = est(z, sigma)            # E[x | z, sigma] estimate, shape of z
    score = est.score(z, sigma)      # (x_hat - z) / sigma^2 (Eq. 5)
"""

from __future__ import annotations

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.exact import ExactPosterior, PosteriorMC
from knn_cm.estimators.knn import KNN, KNNProposal
from knn_cm.estimators.network import NetworkEstimator
from knn_cm.estimators.single import SingleSample
from knn_cm.estimators.stf import STF
from knn_cm.estimators.uniform import UniformSNIS

ESTIMATORS: dict[str, type[Estimator]] = {
    "single": SingleSample,
    "exact": ExactPosterior,
    "mc": PosteriorMC,
    "uniform": UniformSNIS,
    "stf": STF,
    "knn": KNN,
    "network": NetworkEstimator,
}


def make_estimator(name: str, store=None, **kwargs) -> Estimator:
    """Build an estimator by name: "single" "exact" "mc" "uniform" "stf" "knn" "network".

    Keyword arguments go to the estimator: ``n`` (mc, uniform, stf, knn), ``k`` and ``index`` (knn),
    ``variant`` (stf), ``denoiser`` (network), and ``device`` / ``dtype`` (all).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; allowed: {', '.join(ESTIMATORS)}")
    if name == "network":
        return NetworkEstimator(store=store, **kwargs)
    if store is None and name != "single":
        raise ValueError(f"the {name!r} estimator needs a DataStore: make_estimator({name!r}, store, ...)")
    return ESTIMATORS[name](store, **kwargs)


__all__ = ["ESTIMATORS", "Estimator", "ExactPosterior", "KNN", "KNNProposal", "NetworkEstimator", "PosteriorMC",
           "STF", "SingleSample", "UniformSNIS", "make_estimator"]
