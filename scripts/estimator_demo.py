"""Estimator demo on the embedded digits dataset: each estimator's error against the exact posterior mean.

    python scripts/estimator_demo.py [--k 64] [--n 64] [--queries 256] [--repeats 4] [--seed 0]

For each noise level sigma, draws sources x from the data and z = x + sigma * eps, evaluates every
estimator ``repeats`` times per z and prints the mean squared error of the posterior mean per pixel
(Eq. 15) against the exact posterior mean (Eq. 8).
"""

from __future__ import annotations

import argparse
import time

import torch

from knn_cm.data import load_digits
from knn_cm.estimators import make_estimator
from knn_cm.search import build_index

SIGMAS = (0.002, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64, help="KNN search size k")
    parser.add_argument("--n", type=int, default=64, help="draws n for knn, stf and mc")
    parser.add_argument("--queries", type=int, default=256, help="noisy queries z per noise level")
    parser.add_argument("--repeats", type=int, default=4, help="estimator evaluations per z")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    store = load_digits()
    index = build_index(store, "flat")
    exact = make_estimator("exact", store)
    estimators = {
        # One draw from the posterior given z (Eq. 9, n = 1): the single-sample estimator as Section 4.2 studies it.
        "single-sample": make_estimator("mc", store, n=1),
        f"stf(n={args.n})": make_estimator("stf", store, n=args.n),
        f"mc(n={args.n})": make_estimator("mc", store, n=args.n),
        f"knn(k={args.k},n={args.n})": make_estimator("knn", store, index=index, k=args.k, n=args.n),
    }
    generator = torch.Generator().manual_seed(args.seed)
    print(f"digits: N={len(store)}, d={store.dim}; {args.queries} queries x {args.repeats} repeats per sigma")
    print("posterior-mean MSE per pixel against the exact posterior mean (Eq. 15)")
    print(f"{'sigma':>8}" + "".join(f"{name:>20}" for name in estimators))
    for sigma in SIGMAS:
        ids = torch.randint(0, len(store), (args.queries,), generator=generator)
        x = store.float(ids)
        z = x + sigma * torch.randn(x.shape, generator=generator)
        reference = exact(z, sigma)
        row = f"{sigma:>8g}"
        for estimator in estimators.values():
            errors = [(estimator(z, sigma, x=x, generator=generator) - reference).square().mean().item()
                      for _ in range(args.repeats)]
            row += f"{sum(errors) / len(errors):>20.3e}"
        print(row)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
