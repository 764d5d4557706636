"""Figures and tables of the estimator-error study, laid out like the paper's Figure 3."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from knn_cm.evaluation.estimator_error import METRICS, TARGETS, VELOCITY_TARGETS
from knn_cm.io import save_figure

FLOAT32_EPS = 2.0**-23
METRIC_LABELS = {"mse": "MSE", "bias2": "squared bias", "variance": "variance"}
TARGET_LABELS = {"posterior_mean": "posterior mean", "score": "score"}
VELOCITY_LABELS = {"posterior_mean": "posterior mean", "velocity": "velocity target"}


def _series(rows: Sequence[Mapping], estimator: str, target: str, metric: str):
    selected = sorted((r for r in rows if r["estimator"] == estimator and r["target"] == target
                       and r["metric"] == metric), key=lambda r: r["t"])
    return ([r["t"] for r in selected], [r["value"] for r in selected],
            [r["ci_low"] for r in selected], [r["ci_high"] for r in selected])


def estimator_names(rows: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(r["estimator"] for r in rows))


ZERO_GID = "exact_zero"  # the gid of the artists that mark exact zeros (tests find them by it)
ZERO_LABEL = "exact 0 (marker on the t axis)"


def draw_error_series(axis, series: Sequence[tuple[str, str, Sequence[float], Sequence[float], Sequence[float],
                                                   Sequence[float]]]) -> bool:
    """Draw errors on a log y axis: one line per (label, colour, times, values, ci_lows, ci_highs).

    Call after every other line of the panel is drawn (it fixes the y limits). A log axis has no place for 0,
    so a value of exactly 0 (every estimator is exact where the posterior is a point mass) is never drawn as
    a number: its line has a gap there, and a hollow marker sits on the t axis itself (x at t, y at the
    bottom of the panel, in axis coordinates, gid :data:`ZERO_GID`; one ring size per line, so that the
    estimators exact at the same t all show). The shaded band is the 95% interval;
    where its lower end is 0 (or below) it reaches the bottom of the panel, i.e. extends off the scale.
    Returns whether any exact zero was marked.
    """
    import matplotlib.transforms as transforms
    import numpy as np

    drawn = []
    for label, colour, times, values, lows, highs in series:
        shown = [v if v > 0 else np.nan for v in values]
        axis.plot(times, shown, "-o", color=colour, markersize=3, label=label)
        tops = [(t, h) for t, h in zip(times, highs) if h > 0]
        if tops:  # the bands' upper ends count towards the y limits
            axis.update_datalim(tops, updatex=False)
        drawn.append((colour, times, values, lows, highs))
    axis.autoscale_view()
    bottom, top = axis.get_ylim()
    any_zero = False
    for index, (colour, times, values, lows, highs) in enumerate(drawn):
        axis.fill_between(times, [low if low > 0 else bottom for low in lows], [max(h, bottom) for h in highs],
                          where=[h > 0 for h in highs], color=colour, alpha=0.15, linewidth=0)
        zeros = [t for t, v in zip(times, values) if v == 0]
        if zeros:
            any_zero = True
            size = max(3.0, 10.0 - 2.5 * index)  # concentric rings: estimators exact at the same t all show
            marks, = axis.plot(zeros, [0.0] * len(zeros), "o", markerfacecolor="none", color=colour, markersize=size,
                               transform=transforms.blended_transform_factory(axis.transData, axis.transAxes),
                               clip_on=False, zorder=5)
            marks.set_gid(ZERO_GID)
    axis.set_ylim(bottom, top)
    return any_zero


def legend_with_zero_note(axis, any_zero: bool, fontsize: int = 8) -> None:
    """The panel's legend, with a note on the exact-zero marker when the figure has one."""
    from matplotlib.lines import Line2D

    handles, labels = axis.get_legend_handles_labels()
    if any_zero:
        handles.append(Line2D([], [], marker="o", markerfacecolor="none", color="black", linestyle="none"))
        labels.append(ZERO_LABEL)
    axis.legend(handles, labels, fontsize=fontsize)


def plot_study(rows: Sequence[Mapping], path: str | Path, title: str = "") -> None:
    """PNG with one panel per target x metric (log-log error against t), one line per estimator.

    Values of exactly zero (every estimator is exact where the posterior is a point mass) cannot be drawn
    on a log axis: they are marked on the t axis (:func:`draw_error_series`), never at a made-up value. A
    dashed line marks float32 resolution, (eps_32)^2 per pixel (divided by t^4 for the score): errors near
    it are rounding.
    """
    _plot_panels(rows, path, title, TARGETS, TARGET_LABELS, xscale="log", xlabel="t", derived_power=-4)


def study_title(dataset: str, num_sources: int, repeats: int, process: str = "ve") -> str:
    """The title evaluate_estimators.py gives a study's figure and summary: ``dataset`` (e.g.
    ``cifar10_jpeg (N=50000)``), M and R, and the path when it is flow matching's."""
    title = f"{dataset}: M={num_sources}, R={repeats}" if dataset else f"M={num_sources}, R={repeats}"
    if process == "flow_matching":
        title += ", flow-matching path x_t = (1 - t) x + t eps"
    return title


def plot_velocity_study(rows: Sequence[Mapping], path: str | Path, title: str = "") -> None:
    """PNG: posterior-mean and velocity MSE / squared bias / variance against t (logit axis), one line per estimator.

    Exact zeros (every estimator is exact where the posterior is a point mass) are marked on the t axis, never
    drawn at a made-up value (:func:`knn_cm.evaluation.study_plot.draw_error_series`); the shaded band is the
    95% interval over sources; the dashed line is float32 resolution, (eps_32)^2 per pixel (divided by t^2 for
    velocities): errors near it are rounding.
    """
    _plot_panels(rows, path, title, VELOCITY_TARGETS, VELOCITY_LABELS, xscale="logit",
                 xlabel="t (flow matching; 1 = noise)", derived_power=-2)


def _plot_panels(rows: Sequence[Mapping], path: str | Path, title: str, targets: Sequence[str],
                 labels: Mapping[str, str], xscale: str, xlabel: str, derived_power: int) -> None:
    """One panel per target x metric (error against t on ``xscale``, log errors), one line per estimator, exact
    zeros marked on the t axis, and float32 resolution (eps_32)^2 per pixel times t^derived_power for the target
    derived from the posterior mean (the score: -4; a velocity: -2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = estimator_names(rows)
    figure, axes = plt.subplots(len(targets), len(METRICS), figsize=(4.2 * len(METRICS), 3.4 * len(targets)),
                                squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_times = sorted({r["t"] for r in rows})
    any_zero = False
    for row_index, target in enumerate(targets):
        for column, metric in enumerate(METRICS):
            axis = axes[row_index][column]
            axis.set_xscale(xscale)
            axis.set_yscale("log")
            resolution = [FLOAT32_EPS**2 * (1.0 if target == "posterior_mean" else t**derived_power)
                          for t in all_times]
            axis.plot(all_times, resolution, "--", color="grey", linewidth=0.8,
                      label="float32 resolution" if row_index == column == 0 else None)
            series = [(name, colours[i % len(colours)], *_series(rows, name, target, metric))
                      for i, name in enumerate(names)]
            any_zero |= draw_error_series(axis, [line for line in series if line[2]])
            axis.set_xlabel(xlabel)
            axis.set_title(f"{labels[target]} {METRIC_LABELS[metric]}")
            axis.grid(True, which="major", alpha=0.3)
    legend_with_zero_note(axes[0][0], any_zero)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_rows(rows: Sequence[Mapping], path: str | Path, dataset: str = "") -> None:
    """The figure evaluate_estimators.py draws for study rows (e.g. read back by
    :func:`knn_cm.evaluation.estimator_error.read_csv`): :func:`plot_study` for the VE study, the velocity study's
    plot when the rows hold velocity targets; titled by :func:`study_title`."""
    if not rows:
        raise ValueError("no study rows to plot")
    velocity = any(r["target"] == "velocity" for r in rows)
    title = study_title(dataset, rows[0]["num_sources"], rows[0]["repeats"], "flow_matching" if velocity else "ve")
    if velocity:
        plot_velocity_study(rows, path, title=title)
    else:
        plot_study(rows, path, title=title)


def markdown_table(rows: Sequence[Mapping], target: str = "posterior_mean", metric: str = "mse") -> str:
    """A markdown table: one line per t, one column per estimator, of ``target`` ``metric`` values."""
    names = estimator_names(rows)
    times = sorted({r["t"] for r in rows})
    value = {(r["estimator"], r["t"]): r["value"] for r in rows if r["target"] == target and r["metric"] == metric}
    lines = ["| t | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in times:
        cells = [f"{value[(name, t)]:.3g}" if (name, t) in value else "" for name in names]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
