"""Cost of the local denoisers' two forms on CIFAR-10-sized data: time per call, bank memory, KNN error.

    python benchmarks/bench_local_denoisers.py --archive ../shared/data/cifar10-jpeg.tar.gz --sizes 500 2000

For each subset size N (the first N training images) and each estimator, one query batch z = x + sigma eps at
each sigma: the exhaustive form's time, the KNN form's first call (its banks' squared norms are built then) and
second call, and the KNN form's mean squared error to the exhaustive form. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from knn_cm.data import DataStore, load_image_folder
from knn_cm.estimators import make_estimator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed_call

CASES = {
    "ls": {"patch_size": 3},
    "els": {"patch_size": 3, "padding": "circular"},
    "els_zero": {"patch_size": 3, "padding": "zero"},
    "pspc_square": {"patch_size": 7},
    "cfdm": {"smoothing": 0.1, "draws": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    args = parser.parse_args()
    full = load_image_folder(args.archive, subfolder="train")
    for size in args.sizes:
        store = DataStore.from_array(np.ascontiguousarray(full.images[:size]), name=f"cifar10_{size}")
        generator = torch.Generator().manual_seed(0)
        x = store.float(torch.randint(0, size, (args.batch,), generator=generator))
        for case in args.cases:
            name = case.split("_zero")[0]
            exhaustive = make_estimator(name, store, **CASES[case])
            knn = make_estimator(name, store, k=args.k, n=args.n, **CASES[case])
            for sigma in args.sigmas:
                z = x + sigma * torch.randn(x.shape, generator=generator)
                reference, exhaustive_s = timed_call(exhaustive, z, sigma, 1)
                _, first_s = timed_call(knn, z, sigma, 1)
                estimate, knn_s = timed_call(knn, z, sigma, 2)
                print(json.dumps({"N": size, "estimator": case, "sigma": sigma, "batch": args.batch,
                                  "exhaustive_s": round(exhaustive_s, 3), "knn_first_s": round(first_s, 3),
                                  "knn_s": round(knn_s, 3), "speedup": round(exhaustive_s / knn_s, 2),
                                  "knn_mse_to_exhaustive": float((estimate - reference).square().mean()),
                                  "exhaustive_mse_to_z_source": float((reference - x).square().mean())}),
                      flush=True)


if __name__ == "__main__":
    main()
