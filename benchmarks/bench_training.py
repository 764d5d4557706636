"""Training step time of iCT with each estimator on CIFAR-10-sized data, printed as JSON.

    python benchmarks/bench_training.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--batch 128] [--steps 5]
    python benchmarks/bench_training.py --synthetic 50000       # random 3x32x32 data, any machine

Times real trainer steps (``Trainer.train_step``: data, estimator ODE step, student and teacher passes,
backward, RAdam, EMA) of iCT (single-sample estimator, Euler), iCT + KNN (Heun, k 2048, n 256) and iCT + STF
(Heun, n 256) with a small NCSN++ on CPU, and the share of each step spent in the estimator. The paper pays
+17% wall-clock for KNN on A100 nodes (its Table 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from knn_cm.data import DataStore, load_image_folder
from knn_cm.estimators import make_estimator
from knn_cm.models import CMPrecond, SongUNet
from knn_cm.paper import TABLE4
from knn_cm.search import build_index
from knn_cm.training import ICTObjective, Trainer, TrainerConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
SMALL_NCSNPP = dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.3,
                    embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                    resample_filter=[1, 3, 3, 1], fourier_scale=0.02)


def time_steps(store, estimator, solver: str, batch: int, steps: int, warmup: int, run_dir: Path) -> dict:
    torch.manual_seed(0)
    channels, resolution = store.shape[0], store.shape[1]
    network = CMPrecond(SongUNet(img_resolution=resolution, in_channels=channels, out_channels=channels,
                                 **SMALL_NCSNPP))
    objective = ICTObjective(estimator, total_steps=400_000, solver=solver)
    config = TrainerConfig(max_steps=400_000, batch_size=batch, progress=False, resume="never", device="cpu")
    trainer = Trainer(config, run_dir, store, network, objective,
                      lambda params: torch.optim.RAdam(params, lr=1e-4))
    for _ in range(warmup):
        trainer.train_step()
    seconds, estimator_seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        record = trainer.train_step()
        seconds.append(time.perf_counter() - start)
        estimator_seconds.append(float(record["estimator_seconds"]))  # a StageTimer: read once the step is done
    step = statistics.median(seconds)
    return {"seconds_per_step": step, "images_per_s": batch / step,
            "estimator_seconds_per_step": statistics.median(estimator_seconds),
            "estimator_share": statistics.median(estimator_seconds) / step,
            "parameters": sum(p.numel() for p in network.parameters())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--synthetic", type=int, default=0, help="use N random 3x32x32 images instead of --data")
    parser.add_argument("--xflip", action="store_true", default=True, help="x-flip doubling (training default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if args.synthetic:
        images = np.random.default_rng(0).integers(0, 256, (args.synthetic, 3, 32, 32), dtype=np.uint8)
        store = DataStore.from_array(images, name=f"synthetic{args.synthetic}", xflip=args.xflip)
    else:
        if not Path(args.data).exists():
            sys.exit(f"--data {args.data} does not exist; pass --data PATH or --synthetic N")
        store = load_image_folder(args.data, subfolder="train", progress=False).with_xflip(args.xflip)
    runs = {
        "ict": (make_estimator("single", store), "euler"),
        "ict_knn": (make_estimator("knn", store, index=build_index(store, "flat"), k=args.k, n=args.n), "heun"),
        "ict_stf": (make_estimator("stf", store, n=args.n), "heun"),
    }
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__},
              "data": {"name": store.name, "N": len(store), "d": store.dim},
              "settings": {"batch": args.batch, "steps": args.steps, "k": args.k, "n": args.n}, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, (estimator, solver) in runs.items():
            result["runs"][name] = time_steps(store, estimator, solver, args.batch, args.steps, args.warmup,
                                              Path(folder) / name)
    baseline = result["runs"]["ict"]["seconds_per_step"]
    for entry in result["runs"].values():
        entry["time_vs_ict"] = entry["seconds_per_step"] / baseline
    result["paper_table4_time_vs_ict"] = {run.experiment: run.time_vs_ict for run in TABLE4.runs
                                          if run.time_vs_ict != 1}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
