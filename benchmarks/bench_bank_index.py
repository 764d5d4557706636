"""The KNN form with a bank index against the exhaustive form on one bank: time per call and error, per sigma.

    python benchmarks/bench_bank_index.py --archive ../shared/data/cifar10-jpeg.tar.gz --size 500 --case els

Over the first ``--size`` CIFAR-10 training images, one estimator at one patch size in both forms. Queries are
held-out (test split) images x, z = x + sigma eps at each sigma of EDM's 18-step schedule (PSPC's). Printed as one
JSON line per sigma:

- ``exhaustive_s`` / ``knn_s``: seconds per call (the KNN form's bank index is built or loaded before timing);
- ``knn_mse_to_exhaustive``: mean squared difference of the two forms (the KNN form's error);
- ``exhaustive_mse_to_clean``: the exhaustive form's distance to x, the scale the error is judged against
  until a network denoiser stands in for x; ``ratio`` = the first over the second (target <= 0.1);

then one line with the bank index's build time and memory and the worst ratio and speed-up over the sigmas.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from knn_cm.data import DataStore, load_image_folder
from knn_cm.estimators import make_estimator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed_call

EDM_SIGMAS = [80.0, 57.6, 40.8, 28.4, 19.4, 12.9, 8.4, 5.3, 3.26, 1.92, 1.09, 0.59, 0.30, 0.14, 0.06, 0.023, 0.008,
              0.002]
CASES = {
    "els": ("els", {"padding": "circular"}),
    "els_zero": ("els", {"padding": "zero"}),
    "ls": ("ls", {}),
    "pspc_square": ("pspc_square", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--size", type=int, default=500, help="training images in the bank (the first N)")
    parser.add_argument("--case", choices=list(CASES), default="els")
    parser.add_argument("--patch-size", type=int, default=3)
    parser.add_argument("--sigmas", type=float, nargs="+", default=EDM_SIGMAS)
    parser.add_argument("--queries", type=int, default=1, help="held-out query images per call")
    parser.add_argument("--k", type=int, nargs="+", default=[256], help="one KNN form per k, one exhaustive call")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--search", default='{"kind": "ivf_sq8"}', help="the KNN form's search setting (JSON)")
    parser.add_argument("--no-exhaustive", action="store_true", help="time the KNN form only (large N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    search = json.loads(args.search) if args.search.startswith("{") else args.search
    train = load_image_folder(args.archive, subfolder="train")
    test = load_image_folder(args.archive, subfolder="test")
    store = DataStore.from_array(np.ascontiguousarray(train.images[: args.size]), name=f"cifar10_{args.size}")
    generator = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(test), generator=generator)[: args.queries]
    x = torch.from_numpy(test.images[picks.numpy()].astype(np.float32) / 127.5 - 1.0)
    name, kwargs = CASES[args.case]
    kwargs = dict(kwargs, patch_size=args.patch_size)
    exhaustive = make_estimator(name, store, **kwargs)
    knns = {k: make_estimator(name, store, k=k, n=args.n, search=search, **kwargs) for k in args.k}
    start = time.perf_counter()
    for knn in knns.values():  # one bank, one index: built by the first, found by the others
        indexed = knn.filtered().bank_index(knn.layout_for(args.patch_size))
    ready_s = time.perf_counter() - start
    index = indexed[1] if indexed is not None else None
    worst_ratio, speedups = 0.0, []
    for sigma in args.sigmas:
        z = x + sigma * torch.randn(x.shape, generator=generator)
        reference = None
        for k, knn in knns.items():
            estimate, knn_s = timed_call(knn, z, sigma, 1)
            line = {"N": args.size, "case": args.case, "patch_size": args.patch_size, "sigma": sigma,
                    "queries": args.queries, "k": k, "n": args.n, "knn_s": round(knn_s, 3)}
            if not args.no_exhaustive:
                if reference is None:
                    reference, exhaustive_s = timed_call(exhaustive, z, sigma, 1)
                error = float((estimate - reference).square().mean())
                scale = float((reference - x).square().mean())
                worst_ratio = max(worst_ratio, error / scale)
                speedups.append(exhaustive_s / knn_s)
                line |= {"exhaustive_s": round(exhaustive_s, 3), "speedup": round(exhaustive_s / knn_s, 1),
                         "knn_mse_to_exhaustive": error, "exhaustive_mse_to_clean": scale,
                         "ratio": round(error / scale, 4)}
            print(json.dumps(line), flush=True)
    summary = {"N": args.size, "case": args.case, "patch_size": args.patch_size, "search": search,
               "index": repr(index), "index_ready_s": round(ready_s, 2),
               "index_build_s": round(index.build_seconds, 2) if index is not None else None,
               "index_loaded_from_cache": index.loaded if index is not None else None,
               "index_bytes": index.memory_bytes if index is not None else 0}
    if speedups:
        summary |= {"worst_ratio": round(worst_ratio, 4), "min_speedup": round(min(speedups), 1),
                    "median_speedup": round(float(np.median(speedups)), 1)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
