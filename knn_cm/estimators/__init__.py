"""Posterior-mean (score) estimators sharing one contract: ``x_hat = est(z, sigma, x=None, generator=None)``.

    from knn_cm.estimators import make_estimator
    est = make_estimator("knn", store, index=index, k=2048, n=256)
    x_hat = est(z, sigma)            # E[x | z, sigma] estimate, shape of z
    score = est.score(z, sigma)      # (x_hat - z) / sigma^2 (Eq. 5)

A new estimator registers itself by name (``@register_estimator("mine")``, :mod:`knn_cm.estimators.registry`;
a user's package through the ``knn_cm.estimators`` entry point group). From a config (one schema for every app
and the study, ``knn_cm.estimators.factory``):
``build_estimator({"name": "knn", "k": 2048, "n": 256, "index": {"kind": "flat"}}, store, device)``.
"""

from __future__ import annotations

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.exact import ExactPosterior, PosteriorMC
from knn_cm.estimators.factory import build_estimator, build_estimator_set, make_estimator
from knn_cm.estimators.gaussian import GaussianDenoiser
from knn_cm.estimators.knn import KNN, KNNProposal
from knn_cm.estimators.local import ClosedFormSmoothed, EquivariantLocalScore, LocalScore, PSPCSquare
from knn_cm.estimators.network import NetworkEstimator
from knn_cm.estimators.registry import ENTRY_POINT_GROUP, estimator_class, estimator_names, register_estimator
from knn_cm.estimators.single import SingleSample
from knn_cm.estimators.stf import STF
from knn_cm.estimators.uniform import UniformSNIS

__all__ = ["ENTRY_POINT_GROUP", "ClosedFormSmoothed", "Estimator", "EquivariantLocalScore", "ExactPosterior",
           "GaussianDenoiser", "KNN", "KNNProposal", "LocalScore", "NetworkEstimator", "PSPCSquare", "PosteriorMC",
           "STF", "SingleSample", "UniformSNIS", "build_estimator", "build_estimator_set", "estimator_class",
           "estimator_names", "make_estimator", "register_estimator"]
