"""The estimator-error study on the flow-matching path: velocity-target error across t (Figure 3's protocol).

Path x_t = (1 - t) x + t eps, t = 1 is noise (``knn_cm.diffusion.FlowMatchingProcess``). For each t: draw M sources
x_i and one x_t each; the exact posterior mean mu_i = E[x | x_t] (Eq. 8 at the Algorithm 2 query x_t / (1 - t)
and noise level t / (1 - t)) is computed once and shared by every estimator; each estimator is evaluated R times
per x_t through the same query. A velocity target (x_t - x_hat) / t differs from the marginal velocity
v = (x_t - mu) / t by (mu - x_hat) / t, so per pixel

    velocity MSE = posterior-mean MSE / t^2   (likewise squared bias and variance),

with MSE = bias^2 + variance per x_t as in ``knn_cm.evaluation.estimator_error`` (1/R variance). The
single-sample row (Eq. 9 with n = 1: a draw from p(x | x_t)) has the distribution of flow matching's own
conditional target eps - x = (x_t - x) / t, whose source x is such a draw. Each value comes with a 95% interval
over the M sources. Rows have the columns of ``estimator_error.CSV_FIELDS``, with targets "posterior_mean"
and "velocity" and t the flow-matching time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from knn_cm.data import DataStore
from knn_cm.diffusion import FlowMatchingProcess
from knn_cm.estimators import Estimator, make_estimator
from knn_cm.evaluation.estimator_error import VELOCITY_TARGETS, LevelErrors, _progress


def velocity_error_study(store: DataStore, estimators: Mapping[str, Estimator], times: Sequence[float],
                         num_sources: int = 256, repeats: int = 16, batch_size: int = 128, seed: int = 0,
                         exact: Estimator | None = None, device: str | torch.device = "cpu",
                         progress: bool = True) -> list[dict]:
    """The module's protocol; one row per estimator x t x target x metric.

    Args:
        store: the dataset (sources are drawn from it; the exact posterior is over it).
        estimators: name -> estimator, each evaluated ``repeats`` times per x_t (given the sources).
        times: flow-matching times t in (0, 1).
        num_sources, repeats, batch_size, seed, exact, device, progress: as ``estimator_error_study``.
    """
    if num_sources < 1 or repeats < 1 or batch_size < 1:
        raise ValueError(f"num_sources, repeats and batch_size must be >= 1, got {num_sources}, {repeats}, "
                         f"{batch_size}")
    if not times or any(not (0 < t < 1) for t in times):
        raise ValueError(f"study.times must be flow-matching times in (0, 1) for study.process=flow_matching, got "
                         f"{list(times)}")
    process = FlowMatchingProcess()
    exact = exact or make_estimator("exact", store, device=device)
    batches = [(start, min(start + batch_size, num_sources)) for start in range(0, num_sources, batch_size)]
    bar = _progress(len(times) * len(batches), progress)
    rows = []
    for level, t in enumerate(times):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + level)
        draw_generator = torch.Generator(device=exact.device).manual_seed(seed * 1_000_003 + level + 7)
        ids = torch.randint(0, len(store), (num_sources,), generator=generator)
        query_scale, sigma = 1 - t, t / (1 - t)  # Algorithm 2: E[x | x_t] = VE mean at x_t / s(t), sigma(t)
        errors = {name: LevelErrors() for name in estimators}
        for start, stop in batches:
            x = store.float(ids[start:stop]).to(exact.device)
            x_t = process.add_noise(x, t, torch.randn(x.shape, generator=generator).to(exact.device))
            query = x_t / query_scale
            reference = exact(query, sigma)
            for name, estimator in estimators.items():
                errors[name].add(estimator.repeated(query, sigma, repeats, x=x, generator=draw_generator), reference)
            bar.set_postfix(t=f"{t:g}")
            bar.update(1)
        for name in estimators:
            rows.extend(errors[name].rows(name, float(t), repeats, VELOCITY_TARGETS, derived_scale=float(t) ** -2))
    bar.close()
    return rows
