"""Figure 5: sample quality against t_switch for hybrid sampling (Section 6).

For each t_switch and method: ``knn`` / ``stf`` (or any estimator) integrate the PF-ODE from T down to
t_switch and a pretrained network finishes (``hybrid_sample``); ``forward`` noises training images to
t_switch and the network finishes (``forward_process_sample``). Each cell is scored by FID (and IS,
memorisation) against the training set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from knn_cm.data import DataStore
from knn_cm.evaluation.run_evaluation import evaluate_samples, memorisation_index, prepare_metrics
from knn_cm.io import save_figure, write_csv_rows
from knn_cm.runs.layout import RunLayout
from knn_cm.sampling import generate, make_sampler
from knn_cm.settings import positive_int

TSWITCH_FIELDS = ("method", "t_switch", "num_samples", "feature_extractor", "fid", "isc_mean", "isc_std",
                  "fraction_memorised", "mean_nearest_distance")


def tswitch_sweep(network, store: DataStore, estimators: Mapping, t_switches: Sequence[float], metrics: Mapping,
                  num_samples: int, include_forward: bool = True, schedule: Mapping | None = None,
                  seed_start: int = 0, batch_size: int = 256, device="cpu", progress: bool = True) -> list[dict]:
    """Rows (method, t_switch, metrics) for every estimator in ``estimators`` (label -> estimator) used by
    the hybrid sampler, plus the forward-process baseline. The metric settings (and the Inception weights)
    are checked before any sampling."""
    num_samples = positive_int(num_samples, "num_samples")
    metrics = prepare_metrics(metrics, num_samples)
    schedule = dict(schedule or {})
    methods = [(label, "hybrid", estimator) for label, estimator in estimators.items()]
    if include_forward:
        methods.append(("forward", "forward", None))
    seeds = range(seed_start, seed_start + num_samples)
    index = memorisation_index(store, metrics)
    rows = []
    for t_switch in t_switches:
        for label, kind, estimator in methods:
            sampler = make_sampler(kind, network=network, estimator=estimator, store=store, t_switch=float(t_switch),
                                   **schedule)
            samples = generate(sampler, seeds, store.shape, batch_size=batch_size, device=device, progress=progress)
            rows.append({"method": label, "t_switch": float(t_switch), **evaluate_samples(samples, store, metrics,
                                                                                            device, index)})
    return rows


def write_tswitch(rows: Sequence[Mapping], folder: str | Path) -> None:
    """``tswitch.csv`` and ``tswitch.png`` (see :func:`plot_tswitch`) into ``folder``."""
    folder = Path(folder)
    write_csv_rows(RunLayout(folder).tswitch_table, TSWITCH_FIELDS, rows)
    plot_tswitch(rows, folder / "tswitch.png")


def plot_tswitch(rows: Sequence[Mapping], path: str | Path) -> None:
    """Figure 5: FID against t_switch, one line per method, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row["t_switch"], row["fid"]) for row in rows if row["method"] == method and row.get("fid"))
        if points:
            axis.plot(*zip(*points), "-o", markersize=3, label=method)
    axis.set_xscale("symlog", linthresh=0.1)
    axis.set_xlabel("t_switch")
    axis.set_ylabel(f"FID ({rows[0].get('feature_extractor', '')}, {rows[0].get('num_samples', '')} samples)"
                    if rows else "FID")
    axis.legend()
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)

