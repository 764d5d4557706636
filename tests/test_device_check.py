"""scripts/device_check.py: its CPU-side parts (no-CUDA exit, JSON assembly, training-comparison wiring)
with the GPU parts mocked out, so `make device-check` works the first time a GPU is available."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import device_check  # noqa: E402


def test_without_cuda_it_says_so_and_exits_non_zero(capsys):
    assert device_check.main([], cuda_available=False) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_the_script_itself_exits_2_here():
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py")], capture_output=True,
                               text=True, cwd=ROOT)
    assert completed.returncode == 2 and "CUDA is not available" in completed.stderr


def test_json_document_with_mocked_gpu_parts(capsys):
    runners = {
        "tests": lambda: {"passed": True, "summary": "4 passed"},
        "estimators": lambda: {"knn_vs_search_per_t": {"5": 1.05}},
        "training": lambda: {"runs": {"ict": {"seconds_per_step": 1.0}, "ict_knn": {"estimator_share": 0.1}}},
    }
    assert device_check.main([], runners=runners, cuda_available=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device_check"] == "passed" and report["failed_parts"] == []
    assert report["estimators"]["knn_vs_search_per_t"] == {"5": 1.05}
    assert {"torch", "faiss", "loadavg"} <= set(report["environment"])
    assert all("wall_seconds" in report[name] for name in runners)


def test_a_failing_part_is_reported_and_fails_the_check(capsys):
    def broken():
        raise RuntimeError("no kernel image is available")

    runners = {"tests": lambda: {"passed": False, "summary": "1 failed"}, "estimators": broken}
    assert device_check.main([], runners=runners, cuda_available=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["failed_parts"] == ["tests", "estimators"]
    assert report["estimators"]["error"] == "RuntimeError: no kernel image is available"


def test_estimator_part_reads_the_benchmark_json(monkeypatch):
    """The GPU estimator part's summary from a benchmark result of the real script's shape (run on CPU)."""
    import bench_estimators

    real_main = bench_estimators.main
    captured = {}

    def cpu_main(argv):
        captured["argv"] = argv
        return real_main(["--synthetic", "1500", "--k", "32", "--n", "8", "--batch", "4", "--times", "0.5", "20",
                          "--repeats", "1", "--mse-repeats", "1", "--peak-shapes", "small", "--methods"])

    monkeypatch.setattr(bench_estimators, "main", cpu_main)
    summary = device_check.run_estimator_benchmark("unused", 50_000)
    assert captured["argv"][:2] == ["--device", "cuda"] and "--synthetic" in captured["argv"]
    assert set(summary["knn_vs_search_per_t"]) == {"0.5", "20"}
    assert {"faiss_cpu", "torch"} <= set(summary["search_ms_per_query"]["20"])
    assert summary["matmul_peak_gflops"] > 0


def test_training_part_composes_the_papers_ncsnpp():
    """The model config the training comparison instantiates is NCSN++ at 56M parameters."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        config = compose("train", overrides=["dataset=cifar10_jpeg", "model=ncsnpp_ict"]).model
    network = instantiate(config)
    parameters = sum(p.numel() for p in network.parameters())
    assert 55e6 < parameters < 57e6, parameters
