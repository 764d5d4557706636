"""The estimator-error study: protocol, decomposition, outputs, and every study experiment composing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from knn_cm.estimators import make_estimator
from knn_cm.evaluation import estimator_error_study, read_csv
from knn_cm.search import build_index

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import evaluate_estimators  # noqa: E402


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "estimator_study"), version_base="1.3"):
        return compose(config_name="estimator_study", overrides=overrides)


def test_tiny_study_writes_csv_and_plot_and_knn_beats_stf(tmp_path):
    config = _compose(["study.times=[0.01,1.0,40.0]", "study.num_sources=48", "study.repeats=6",
                       "study.progress=false", "estimators.knn.k=64", "estimators.knn.n=64", "estimators.stf.n=64"])
    rows = evaluate_estimators.run(config, tmp_path)
    assert (tmp_path / "results.csv").exists() and (tmp_path / "estimator_error.png").stat().st_size > 10_000
    assert (tmp_path / "config.yaml").exists() and "knn" in (tmp_path / "summary.md").read_text()
    assert len(read_csv(tmp_path / "results.csv")) == len(rows) == 3 * 3 * 2 * 3
    value = {(r["estimator"], r["t"], r["target"], r["metric"]): r["value"] for r in rows}
    # Intermediate t on digits: the posterior spreads over a few images; KNN is far below STF.
    assert value[("knn", 1.0, "posterior_mean", "mse")] < 0.5 * value[("stf", 1.0, "posterior_mean", "mse")]
    # Small t: the posterior is a point mass, every estimator is exact to float precision.
    for name in ("single-sample", "stf", "knn"):
        assert value[(name, 0.01, "posterior_mean", "mse")] < 1e-12
    # The single-sample estimator is a draw from the posterior given z (Section 4.2): unbiased, so its error is
    # variance, and its squared bias is only the variance of the mean of R draws (about variance / R).
    for t in (1.0, 40.0):
        variance = value[("single-sample", t, "posterior_mean", "variance")]
        assert variance > 0 and value[("single-sample", t, "posterior_mean", "bias2")] < 0.5 * variance


def test_mse_is_bias_squared_plus_variance(random_store):
    index = build_index(random_store, "flat")
    estimators = {"knn": make_estimator("knn", random_store, index=index, k=32, n=8),
                  "stf": make_estimator("stf", random_store, n=8),
                  "mc": make_estimator("mc", random_store, n=8)}
    rows = estimator_error_study(random_store, estimators, [0.5, 1.5, 5.0], num_sources=40, repeats=5,
                                 batch_size=16, progress=False)
    value = {(r["estimator"], r["t"], r["target"], r["metric"]): r for r in rows}
    for (name, t, target, metric), row in value.items():
        if metric == "mse":
            bias2, variance = value[(name, t, target, "bias2")]["value"], value[(name, t, target, "variance")]["value"]
            assert row["value"] == pytest.approx(bias2 + variance, rel=1e-9, abs=1e-300)
            assert row["ci_low"] <= row["value"] <= row["ci_high"]
        if target == "score":
            assert row["value"] == pytest.approx(value[(name, t, "posterior_mean", metric)]["value"] / t**4, rel=1e-12)


def test_study_is_reproducible(random_store):
    estimators = {"stf": make_estimator("stf", random_store, n=8)}
    first = estimator_error_study(random_store, estimators, [1.0], num_sources=8, repeats=3, progress=False)
    second = estimator_error_study(random_store, estimators, [1.0], num_sources=8, repeats=3, progress=False)
    assert first == second


@pytest.mark.parametrize("bad", [{"num_sources": 0}, {"repeats": 0}, {"times": []}, {"times": [0.0, 1.0]}])
def test_study_bad_input(random_store, bad):
    kwargs = {"num_sources": 4, "repeats": 2, "times": [1.0]} | bad
    times = kwargs.pop("times")
    with pytest.raises(ValueError):
        estimator_error_study(random_store, {}, times, progress=False, **kwargs)


STUDY = ROOT / "configs" / "estimator_study"


@pytest.mark.parametrize("estimator_set", sorted(p.stem for p in (STUDY / "estimator_set").glob("*.yaml")))
def test_single_sample_rows_are_posterior_draws(estimator_set):
    # Figure 3's single-sample baseline is x_1 ~ p_t(x | z) (Eq. 9, n = 1), not z's own source: the source
    # is fixed given z, so repeats of it would show zero variance and all of its error as bias.
    specs = _compose([f"estimator_set@estimators={estimator_set}"]).estimators
    assert all(spec.name != "single" for spec in specs.values())
    for label, spec in specs.items():
        if label.startswith("single"):
            assert label == "single-sample" and spec.name == "mc" and spec.n == 1


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (STUDY / "experiment").glob("*.yaml")))
def test_study_experiments_compose(experiment):
    config = _compose([f"experiment={experiment}"])
    assert config.study.num_sources >= 256 and config.study.repeats >= 16
    assert config.dataset.xflip is False, "the study's posterior is over the dataset itself"
    assert len([spec for spec in config.estimators.values() if spec is not None]) >= 3
    assert len(config.study.times) >= 12


def test_study_with_a_network_checkpoint_and_approximate_index(tmp_path):
    """The study's optional network estimator (as the paper's EDM) and an IVF-backed KNN from specs."""
    from knn_cm.data import load_digits
    from knn_cm.estimators import build_estimator_set
    from knn_cm.models import EDMPrecond, SongUNet, save_network

    torch.manual_seed(0)
    network = EDMPrecond(SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    save_network(tmp_path / "net.pt", network)
    store = load_digits()
    estimators = build_estimator_set({"edm": {"name": "network", "checkpoint": str(tmp_path / "net.pt")},
                                   "knn_ivf": {"name": "knn", "k": 64, "n": 16,
                                               "index": {"kind": "ivf", "nlist": 16, "nprobe": 4}}}, store)
    rows = estimator_error_study(store, estimators, [0.5, 5.0], num_sources=16, repeats=4, progress=False)
    value = {(r["estimator"], r["t"], r["metric"]): r["value"] for r in rows if r["target"] == "posterior_mean"}
    assert value[("edm", 5.0, "variance")] == 0.0, "a network is deterministic"
    assert value[("edm", 5.0, "mse")] > 0 and value[("knn_ivf", 5.0, "variance")] > 0
    with pytest.raises(ValueError, match="checkpoint"):
        build_estimator_set({"edm": {"name": "network"}}, store)


# ------------------------------------------------------------------ exact zeros are zeros
def _study_rows(targets, times, zero):
    """Rows for two estimators, every value positive except ``zero`` = (estimator, target, metric, t)."""
    from knn_cm.evaluation.estimator_error import METRICS

    rows = []
    for e, estimator in enumerate(("exact", "knn")):
        for target in targets:
            for metric in METRICS:
                for i, t in enumerate(times):
                    value = 0.0 if (estimator, target, metric, t) == zero else 10.0 ** (-3 - i - e)
                    rows.append({"estimator": estimator, "target": target, "metric": metric, "t": t,
                                 "value": value, "ci_low": value / 2, "ci_high": value * 2 if value else 0.0})
    return rows


def _drawn_figure(monkeypatch, module, plot, rows, tmp_path):
    captured = []
    monkeypatch.setattr(module, "save_figure", lambda figure, path: captured.append(figure))
    plot(rows, tmp_path / "plot.png")
    return captured[0]


@pytest.mark.parametrize("study", ["ve", "flow_matching"])
def test_an_exact_zero_is_drawn_as_the_zero_marker_not_at_a_floor(monkeypatch, tmp_path, study):
    """A variance of exactly 0 in the rows: the estimator's line has a gap there (no made-up value), and a hollow
    marker sits on the t axis (y = 0 in axis coordinates) at that t; the legend says what the marker means."""
    import numpy as np

    from knn_cm.evaluation import study_plot

    if study == "ve":
        module, plot, targets, times = study_plot, study_plot.plot_study, ("posterior_mean", "score"), [0.01, 1.0, 40.0]
    else:
        module, plot, targets, times = (study_plot, study_plot.plot_velocity_study,
                                        ("posterior_mean", "velocity"), [0.1, 0.5, 0.9])
    zero_t = times[0]
    figure = _drawn_figure(monkeypatch, module, plot,
                           _study_rows(targets, times, ("knn", "posterior_mean", "variance", zero_t)), tmp_path)
    axes = figure.axes
    panel = next(a for a in axes if a.get_title() == "posterior mean variance")
    knn_line = next(line for line in panel.get_lines() if line.get_label() == "knn")
    knn_y = dict(zip(knn_line.get_xdata(), knn_line.get_ydata()))
    assert np.isnan(knn_y[zero_t]) and all(v > 0 for t, v in knn_y.items() if t != zero_t)
    (marks,) = [line for line in panel.get_lines() if line.get_gid() == study_plot.ZERO_GID]
    assert list(marks.get_xdata()) == [zero_t] and list(marks.get_ydata()) == [0.0]
    # y in axis coordinates: the marker's centre is on the bottom edge of the panel whatever its y limits.
    x_pixels, y_pixels = marks.get_transform().transform((zero_t, 0.0))
    assert y_pixels == pytest.approx(panel.transAxes.transform((0.0, 0.0))[1])
    assert x_pixels == pytest.approx(panel.transData.transform((zero_t, 1.0))[0])
    assert marks.get_markerfacecolor() == "none" and marks.get_color() == knn_line.get_color()
    # No estimator's line holds a value below the smallest positive value in the rows (no floor point).
    drawn = [y for line in panel.get_lines() if line.get_label() in ("exact", "knn")
             for y in np.asarray(line.get_ydata(), dtype=float) if np.isfinite(y)]
    positive = [r["value"] for r in _study_rows(targets, times, None)
                if r["target"] == "posterior_mean" and r["metric"] == "variance"]
    assert min(drawn) == min(positive)
    # Only the panel with the zero has a zero marker; the legend explains it.
    assert sum(line.get_gid() == study_plot.ZERO_GID for a in axes for line in a.get_lines()) == 1
    legend = axes[0].get_legend()
    assert study_plot.ZERO_LABEL in [text.get_text() for text in legend.get_texts()]
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_no_zero_no_zero_note(monkeypatch, tmp_path):
    from knn_cm.evaluation import study_plot

    figure = _drawn_figure(monkeypatch, study_plot, study_plot.plot_study,
                           _study_rows(("posterior_mean", "score"), [0.01, 1.0], None), tmp_path)
    assert study_plot.ZERO_LABEL not in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert not [line for a in figure.axes for line in a.get_lines() if line.get_gid() == study_plot.ZERO_GID]
    import matplotlib.pyplot as plt

    plt.close(figure)


@pytest.mark.parametrize("study", ["ve", "flow_matching"])
def test_a_figure_redrawn_from_its_csv_marks_the_zero_and_keeps_the_title(monkeypatch, tmp_path, study):
    """scripts/plot_estimator_study.py's path: rows written by write_csv (as evaluate_estimators.py writes
    results.csv) and read back draw the zero as the marker on the t axis, not as a point, in the study's own
    plot (the velocity plot for velocity rows) and under evaluate_estimators.py's title."""
    import numpy as np

    from knn_cm.evaluation import study_plot, write_csv

    targets, times, module = ((("posterior_mean", "score"), [0.01, 1.0, 40.0], study_plot) if study == "ve" else
                              (("posterior_mean", "velocity"), [0.1, 0.5, 0.9], study_plot))
    rows = [dict(row, num_sources=8, repeats=3)
            for row in _study_rows(targets, times, ("knn", "posterior_mean", "mse", times[1]))]
    write_csv(rows, tmp_path / "results.csv")
    read_back = read_csv(tmp_path / "results.csv")
    figure = _drawn_figure(monkeypatch, module,
                           lambda r, path: study_plot.plot_rows(r, path, dataset="toy (N=5)"), read_back, tmp_path)
    assert figure.get_suptitle() == study_plot.study_title("toy (N=5)", 8, 3, study)
    panel = next(a for a in figure.axes if a.get_title() == "posterior mean MSE")
    knn_line = next(line for line in panel.get_lines() if line.get_label() == "knn")
    assert np.isnan(dict(zip(knn_line.get_xdata(), knn_line.get_ydata()))[times[1]])
    (marks,) = [line for a in figure.axes for line in a.get_lines() if line.get_gid() == study_plot.ZERO_GID]
    assert marks.axes is panel and list(marks.get_xdata()) == [times[1]]
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_plot_estimator_study_script_writes_the_png(tmp_path):
    """The documented re-plot command as a process: a PNG from a results.csv; a missing file is one error line."""
    import subprocess

    from knn_cm.evaluation import write_csv

    script = Path(__file__).resolve().parents[3] / "scripts" / "plot_estimator_study.py"
    rows = [dict(row, num_sources=8, repeats=3) for row in _study_rows(("posterior_mean", "score"), [0.01, 1.0],
                                                                      ("knn", "score", "variance", 0.01))]
    write_csv(rows, tmp_path / "results.csv")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "results.csv"), str(tmp_path / "out.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "none.csv"), str(tmp_path / "no.png")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"error: rows: no file {tmp_path / 'none.csv'} (a results.csv written by evaluate_estimators.py)"]
    assert not (tmp_path / "no.png").exists()
