"""Figures and tables of the estimator-error study, laid out like the paper's Figure 3."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from knn_cm.evaluation.estimator_error import METRICS, TARGETS
from knn_cm.io import save_figure

FLOAT32_EPS = 2.0**-23
METRIC_LABELS = {"mse": "MSE", "bias2": "squared bias", "variance": "variance"}
TARGET_LABELS = {"posterior_mean": "posterior mean", "score": "score"}


def _series(rows: Sequence[Mapping], estimator: str, target: str, metric: str):
    selected = sorted((r for r in rows if r["estimator"] == estimator and r["target"] == target
                       and r["metric"] == metric), key=lambda r: r["t"])
    return ([r["t"] for r in selected], [r["value"] for r in selected],
            [r["ci_low"] for r in selected], [r["ci_high"] for r in selected])


def estimator_names(rows: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(r["estimator"] for r in rows))


def plot_study(rows: Sequence[Mapping], path: str | Path, title: str = "") -> None:
    """PNG with one panel per target x metric (log-log error against t), one line per estimator.

    Values of exactly zero (every estimator is exact where the posterior is a point mass) cannot be drawn
    on a log axis: they are shown as hollow markers on the panel's floor. A dashed line marks float32
    resolution, (eps_32)^2 per pixel (divided by t^4 for the score): errors near it are rounding.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = estimator_names(rows)
    figure, axes = plt.subplots(len(TARGETS), len(METRICS), figsize=(4.2 * len(METRICS), 3.4 * len(TARGETS)),
                                squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row_index, target in enumerate(TARGETS):
        for column, metric in enumerate(METRICS):
            axis = axes[row_index][column]
            positive = [v for r in rows if r["target"] == target and r["metric"] == metric for v in [r["value"]] if v > 0]
            floor = min(positive) / 10 if positive else 1e-12
            for i, name in enumerate(names):
                times, values, lows, highs = _series(rows, name, target, metric)
                if not times:
                    continue
                colour = colours[i % len(colours)]
                shown = [max(v, floor) for v in values]
                axis.plot(times, shown, "-o", color=colour, markersize=3, label=name)
                # Shade the 95% interval where it lies above zero (a log axis cannot show the rest).
                axis.fill_between(times, [max(low if low > 0 else v, floor) for low, v in zip(lows, values)],
                                  [max(v, floor) for v in highs], color=colour, alpha=0.15, linewidth=0)
                zeros = [(t, floor) for t, v in zip(times, values) if v <= 0]
                if zeros:
                    axis.plot(*zip(*zeros), "o", markerfacecolor="none", color=colour, markersize=5)
            all_times = sorted({r["t"] for r in rows})
            resolution = [FLOAT32_EPS**2 * (1.0 if target == "posterior_mean" else t**-4) for t in all_times]
            axis.plot(all_times, resolution, "--", color="grey", linewidth=0.8,
                      label="float32 resolution" if row_index == column == 0 else None)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel("t")
            axis.set_title(f"{TARGET_LABELS[target]} {METRIC_LABELS[metric]}")
            axis.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


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
