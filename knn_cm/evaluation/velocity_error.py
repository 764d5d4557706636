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
from pathlib import Path

import torch

from knn_cm.data import DataStore
from knn_cm.diffusion import FlowMatchingProcess
from knn_cm.estimators import Estimator, make_estimator
from knn_cm.evaluation.estimator_error import METRICS, LevelErrors, _progress
from knn_cm.evaluation.study_plot import FLOAT32_EPS, METRIC_LABELS, draw_error_series, legend_with_zero_note
from knn_cm.io import save_figure

VELOCITY_TARGETS = ("posterior_mean", "velocity")


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


def plot_velocity_study(rows: Sequence[Mapping], path: str | Path, title: str = "") -> None:
    """PNG: posterior-mean and velocity MSE / squared bias / variance against t (logit axis), one line per estimator.

    Exact zeros (every estimator is exact where the posterior is a point mass) are marked on the t axis, never
    drawn at a made-up value (:func:`knn_cm.evaluation.study_plot.draw_error_series`); the shaded band is the
    95% interval over sources; the dashed line is float32 resolution, (eps_32)^2 per pixel (divided by t^2 for
    velocities): errors near it are rounding.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["estimator"] for r in rows))
    labels = {"posterior_mean": "posterior mean", "velocity": "velocity target"}
    figure, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 6.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_zero = False
    for row_index, target in enumerate(VELOCITY_TARGETS):
        for column, metric in enumerate(METRICS):
            axis = axes[row_index][column]
            axis.set_xscale("logit")
            axis.set_yscale("log")
            all_times = sorted({r["t"] for r in rows})
            resolution = [FLOAT32_EPS**2 * (1.0 if target == "posterior_mean" else t**-2) for t in all_times]
            axis.plot(all_times, resolution, "--", color="grey", linewidth=0.8,
                      label="float32 resolution" if row_index == column == 0 else None)
            chosen = [r for r in rows if r["target"] == target and r["metric"] == metric]
            series = []
            for i, name in enumerate(names):
                line = sorted((r for r in chosen if r["estimator"] == name), key=lambda r: r["t"])
                if line:
                    series.append((name, colours[i % len(colours)], [r["t"] for r in line],
                                   [r["value"] for r in line], [r["ci_low"] for r in line],
                                   [r["ci_high"] for r in line]))
            any_zero |= draw_error_series(axis, series)
            axis.set_xlabel("t (flow matching; 1 = noise)")
            axis.set_title(f"{labels[target]} {METRIC_LABELS[metric]}")
            axis.grid(True, which="major", alpha=0.3)
    legend_with_zero_note(axes[0][0], any_zero)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
