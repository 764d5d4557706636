"""The benchmark scripts run end to end on small synthetic data and print JSON (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_estimators  # noqa: E402


def test_estimator_benchmark_smoke(capsys):
    result = bench_estimators.main(["--synthetic", "2000", "--k", "64", "--n", "16", "--batch", "8", "--times", "0.5",
                                    "20", "--ivf-nlist", "16", "--ivf-nprobe", "2", "16", "--repeats", "1",
                                    "--peak-size", "256"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"] == {"name": "synthetic2000", "N": 2000, "d": 3072}
    entry = result["per_t"]["20"]
    assert set(entry) == {"flat_search", "knn_flat", "knn_ivf_p2", "knn_ivf_p16", "stf", "exact"}
    assert entry["knn_ivf_p16"]["mse_vs_exact"] >= 0 and entry["exact"]["gflops"] > 0

import bench_training  # noqa: E402


def test_training_benchmark_smoke(capsys):
    result = bench_training.main(["--synthetic", "300", "--batch", "4", "--steps", "1", "--warmup", "0",
                                  "--k", "16", "--n", "8", "--threads", "1"])
    assert set(result["runs"]) == {"ict", "ict_knn", "ict_stf"}
    assert result["runs"]["ict"]["time_vs_ict"] == 1.0 and result["runs"]["ict_knn"]["estimator_share"] > 0
    assert json.loads(capsys.readouterr().out)["data"]["N"] == 600  # x-flip doubling
