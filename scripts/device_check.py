"""One command that checks a GPU machine: ``make device-check`` (or ``python scripts/device_check.py``).

On a machine with CUDA it runs, on one GPU and in about 5-8 minutes:

1. the CUDA tests (``pytest -m cuda``-style selection: every test that skips without CUDA, in
   tests/test_sync_free.py, tests/test_torch_index.py and tests/test_stage_timer.py): estimators and two
   training steps under ``torch.cuda.set_sync_debug_mode("error")``, compared with CPU results, and the
   event-timed estimator share of a step;
2. the estimator benchmark on the GPU (``benchmarks/bench_estimators.py --device cuda``): the torch
   index's search against faiss-gpu's (if installed) and faiss on the CPU, and the whole ``knn``
   estimator against its bare search, per t;
3. a training-step comparison, iCT (single-sample, Euler) against iCT + KNN (Heun, k 2048, n 256) with
   the paper's NCSN++ (56M parameters, ``configs/model/ncsnpp_ict.yaml``) at batch 128 on CIFAR-10-sized
   data (the CIFAR-10 archive when present, else synthetic uint8 images: the JSON says which), with
   the estimator's share of each step (timed with CUDA synchronisation around its calls);

and prints one JSON document. Without CUDA it says so and exits with status 2. It installs nothing:
it needs the README's set-up only (faiss-gpu is optional).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CUDA_TESTS = ["tests/test_sync_free.py", "tests/test_torch_index.py", "tests/test_stage_timer.py"]
NO_CUDA_MESSAGE = "device-check: CUDA is not available on this machine (torch.cuda.is_available() is False); " \
                  "run it on a GPU node. Nothing was checked."


def run_cuda_tests() -> dict:
    """The CUDA-only tests: pytest on the files that hold them, selected by the 'cuda' keyword."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", *CUDA_TESTS]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = [line for line in completed.stdout.splitlines() if " passed" in line or " failed" in line
               or " error" in line or " skipped" in line]
    return {"command": " ".join(command[1:]), "returncode": completed.returncode,
            "summary": summary[-1] if summary else completed.stdout[-500:], "seconds": time.perf_counter() - started,
            "passed": completed.returncode == 0}


def run_estimator_benchmark(data: str, synthetic: int) -> dict:
    import bench_estimators

    argv = ["--device", "cuda", "--repeats", "5", "--mse-repeats", "2", "--methods"]
    argv += ["--synthetic", str(synthetic)] if synthetic else ["--data", data]
    result = bench_estimators.main(argv)
    per_t = result["per_t"]
    return {
        "data": result["data"],
        "search_ms_per_query": {t: {name.removeprefix("search_"): entry[name]["ms_per_query"]
                                    for name in entry if name.startswith("search_")} for t, entry in per_t.items()},
        "knn_vs_search_per_t": result["targets"]["knn_vs_flat_search_per_t (target <= 1.10)"],
        "knn_ms_per_query": {t: entry["knn_flat"]["ms_per_query"] for t, entry in per_t.items()},
        "exact_fraction_of_peak_min": result["targets"]["exact_fraction_of_peak_min"],
        "matmul_peak_gflops": result["matmul_peak"]["gflops"],
    }


def run_training_comparison(data: str, synthetic: bool, batch: int = 128, steps: int = 5, warmup: int = 2,
                            k: int = 2048, n: int = 256) -> dict:
    """Seconds per step of iCT and iCT + KNN with NCSN++ (56M) on one GPU, and the estimator's share."""
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from knn_cm.data import DataStore, load_image_folder
    from knn_cm.estimators import make_estimator
    from knn_cm.index import build_index
    from knn_cm.training import ICTObjective, Trainer, TrainerConfig

    device = torch.device("cuda")
    if synthetic or not Path(data).exists():
        images = np.random.default_rng(0).integers(0, 256, (50_000, 3, 32, 32), dtype=np.uint8)
        store, source = DataStore.from_array(images, name="synthetic50000", xflip=True), "synthetic uint8 50,000 x 3x32x32"
    else:
        store, source = load_image_folder(data, subfolder="train", progress=False).with_xflip(True), f"CIFAR-10 ({data})"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        model_config = compose("train", overrides=["dataset=cifar10_jpeg", "model=ncsnpp_ict"]).model

    class Timed:
        """The estimator with CUDA-synchronised timing around each call (the step itself is unchanged)."""

        def __init__(self, estimator):
            self.estimator, self.seconds = estimator, 0.0

        def __getattr__(self, name):
            return getattr(self.estimator, name)

        def __call__(self, *args, **kwargs):
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = self.estimator(*args, **kwargs)
            torch.cuda.synchronize()
            self.seconds += time.perf_counter() - started
            return out

    runs = {}
    for name, solver in (("ict", "euler"), ("ict_knn", "heun")):
        if name == "ict":
            estimator = make_estimator("single", store, device=device)
        else:
            estimator = make_estimator("knn", store, index=build_index(store, "torch", device=device), k=k, n=n,
                                       device=device)
        timed = Timed(estimator)
        torch.manual_seed(0)
        network = instantiate(model_config)
        objective = ICTObjective(timed, total_steps=400_000, solver=solver)
        config = TrainerConfig(max_steps=400_000, batch_size=batch, progress=False, resume="never", device="cuda")
        with __import__("tempfile").TemporaryDirectory() as folder:
            trainer = Trainer(config, Path(folder), store, network, objective,
                              lambda params: torch.optim.RAdam(params, lr=1e-4), estimator_device=device)
            for _ in range(warmup):
                trainer.train_step()
            torch.cuda.synchronize()
            timed.seconds = 0.0
            started = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            torch.cuda.synchronize()
            step_seconds = (time.perf_counter() - started) / steps
        runs[name] = {"seconds_per_step": step_seconds, "images_per_s": batch / step_seconds,
                      "estimator_seconds_per_step": timed.seconds / steps,
                      "estimator_share": timed.seconds / steps / step_seconds,
                      "parameters": sum(p.numel() for p in network.parameters())}
    runs["ict_knn"]["time_vs_ict"] = runs["ict_knn"]["seconds_per_step"] / runs["ict"]["seconds_per_step"]
    return {"data": source, "batch": batch, "steps": steps, "warmup": warmup, "k": k, "n": n,
            "model": "NCSN++ (configs/model/ncsnpp_ict.yaml)", "runs": runs, "paper_table4_time_vs_ict": 1.17}


def assemble(environment: dict, parts: dict) -> dict:
    """The one JSON document: environment, each part's result or its error, and an overall verdict."""
    failures = [name for name, part in parts.items() if "error" in part or part.get("passed") is False]
    return {"device_check": "passed" if not failures else "failed", "failed_parts": failures,
            "environment": environment, **parts}


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "loadavg": os.getloadavg()}
    try:
        import faiss

        info |= {"faiss": faiss.__version__, "faiss_gpu": hasattr(faiss, "StandardGpuResources")}
    except ImportError:
        info["faiss"] = None
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count()}
    return info


def main(argv=None, runners: dict | None = None, cuda_available=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--synthetic", action="store_true", help="synthetic data even when CIFAR-10 is present")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "estimators", "training"])
    args = parser.parse_args(argv)
    import torch

    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    synthetic = args.synthetic or not Path(args.data).exists()
    runners = runners or {
        "tests": run_cuda_tests,
        "estimators": lambda: run_estimator_benchmark(args.data, 50_000 if synthetic else 0),
        "training": lambda: run_training_comparison(args.data, synthetic),
    }
    parts = {}
    for name, runner in runners.items():
        if name in args.skip:
            continue
        started = time.perf_counter()
        try:
            parts[name] = runner()
        except Exception as error:  # report every part, even when one fails
            parts[name] = {"error": f"{type(error).__name__}: {error}"}
        parts[name]["wall_seconds"] = time.perf_counter() - started
    report = assemble(environment(), parts)
    print(json.dumps(report, indent=1))
    return 0 if report["device_check"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
