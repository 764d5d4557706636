"""Estimator throughput on CIFAR-10-sized data, printed as JSON.

    python benchmarks/bench_estimators.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--threads 2]
    python benchmarks/bench_estimators.py --synthetic 5000   # random data, any machine

Measures, for batches of ``--batch`` queries z = x + t * eps: the faiss flat search alone (k), the
whole ``knn`` estimator on flat and IVF indexes, ``exact`` and ``stf`` (and STF's own two distance
products), at several t. Reports ms/query, queries/s, achieved GFLOP/s of the matrix products
against this machine's measured float32 matmul peak, and each estimator's MSE against ``exact``
on the same queries. Medians over ``--repeats`` timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from knn_cm.data import DataStore, load_image_folder
from knn_cm.estimators import make_estimator
from knn_cm.index import build_index

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: resident rows, buffers, faiss threads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def rate(seconds: float, batch: int, flops: float | None = None, peak: float | None = None) -> dict:
    out = {"ms_per_query": 1e3 * seconds / batch, "queries_per_s": batch / seconds}
    if flops is not None:
        out["gflops"] = flops / seconds / 1e9
        out["fraction_of_peak"] = out["gflops"] / peak
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 image folder or archive (train/)")
    parser.add_argument("--synthetic", type=int, default=0, help="use N random 3x32x32 images instead of --data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--times", type=float, nargs="+", default=[0.002, 1.0, 5.0, 20.0, 80.0])
    parser.add_argument("--ivf-nlist", type=int, default=1024)
    parser.add_argument("--ivf-nprobe", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-size", type=int, default=4096, help="matrix size of the matmul peak measurement")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if args.synthetic:
        images = np.random.default_rng(args.seed).integers(0, 256, (args.synthetic, 3, 32, 32), dtype=np.uint8)
        store = DataStore.from_array(images, name=f"synthetic{args.synthetic}")
    else:
        if not Path(args.data).exists():
            sys.exit(f"--data {args.data} does not exist; pass --data PATH or --synthetic N")
        store = load_image_folder(args.data, subfolder="train", progress=False)
    size, dim, batch = len(store), store.dim, args.batch
    peak = matmul_peak_gflops(args.peak_size)
    flat = build_index(store, "flat")
    build_start = time.perf_counter()
    nlist = min(args.ivf_nlist, size // 39)
    probes = sorted({min(nprobe, nlist) for nprobe in args.ivf_nprobe})
    # One IVF index per nprobe (they share the cached trained index; nprobe is a search setting).
    ivfs = {nprobe: build_index(store, "ivf", nlist=nlist, nprobe=nprobe) for nprobe in probes}
    ivf_build_s = time.perf_counter() - build_start

    estimators = {"knn_flat": make_estimator("knn", store, index=flat, k=args.k, n=args.n)}
    for nprobe, ivf in ivfs.items():
        estimators[f"knn_ivf_p{nprobe}"] = make_estimator("knn", store, index=ivf, k=args.k, n=args.n)
    estimators["stf"] = make_estimator("stf", store, n=args.n)
    estimators["exact"] = make_estimator("exact", store)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, size, (batch,), generator=generator)
    x = store.float(ids)
    eps = torch.randn(x.shape, generator=generator)

    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "faiss": faiss.__version__},
        "data": {"name": store.name, "N": size, "d": dim},
        "settings": {"batch": batch, "k": args.k, "n": args.n, "ivf_nlist": nlist, "ivf_nprobe": probes,
                     "repeats": args.repeats, "ivf_build_s_or_cache_load_s": ivf_build_s},
        "matmul_peak_gflops": peak,
        "per_t": {},
    }
    search_seconds = median_seconds(lambda: flat.search((x + eps).reshape(batch, -1), args.k), args.repeats)
    result["flat_search"] = rate(search_seconds, batch, 2 * batch * size * dim, peak)

    reference_rows = store.resident("cpu").rows[: args.n]
    weights = torch.softmax(torch.randn(batch, args.n), dim=1)
    zf = (x + eps).reshape(batch, -1)
    stf_products = median_seconds(lambda: (zf @ reference_rows.T, weights @ reference_rows), args.repeats)
    result["stf_distance_products"] = rate(stf_products, batch, 4 * batch * args.n * dim, peak)

    for t in args.times:
        z = x + t * eps
        entry = {}
        reference = estimators["exact"](z, t)
        for name, estimator in estimators.items():
            seconds = median_seconds(lambda: estimator(z, t, x=x, generator=generator), args.repeats)
            flops = 4 * batch * size * dim if name == "exact" else None
            entry[name] = rate(seconds, batch, flops, peak)
            if name != "exact":
                entry[name]["mse_vs_exact"] = (estimator(z, t, x=x, generator=generator) - reference).square().mean().item()
        # The search alone on this t's queries, timed next to the estimator so machine drift cancels.
        search_seconds = median_seconds(lambda: flat.search(z.reshape(batch, -1), args.k), args.repeats)
        entry["flat_search"] = rate(search_seconds, batch)
        entry["knn_flat"]["cost_vs_flat_search"] = entry["knn_flat"]["ms_per_query"] / entry["flat_search"]["ms_per_query"]
        for nprobe in probes:
            ivf_entry, flat_entry = entry[f"knn_ivf_p{nprobe}"], entry["knn_flat"]
            ivf_entry["speedup_vs_knn_flat"] = flat_entry["ms_per_query"] / ivf_entry["ms_per_query"]
            # MSE ratio to flat's; both are exact to rounding (~1e-15) where the posterior is a point mass.
            ivf_entry["mse_vs_knn_flat_mse"] = ivf_entry["mse_vs_exact"] / max(flat_entry["mse_vs_exact"], 1e-12)
        entry["stf"]["cost_vs_own_distance_products"] = entry["stf"]["ms_per_query"] / result["stf_distance_products"]["ms_per_query"]
        result["per_t"][f"{t:g}"] = entry

    per_t = result["per_t"].values()
    result["targets"] = {
        "knn_at_most_1.25x_flat_search_every_t": max(e["knn_flat"]["cost_vs_flat_search"] for e in per_t),
        "exact_fraction_of_peak_min": min(e["exact"]["fraction_of_peak"] for e in per_t),
        "stf_at_most_2x_own_products_max": max(e["stf"]["cost_vs_own_distance_products"] for e in per_t),
        "knn_ivf_speedup_and_mse_ratio_per_t": {
            f"nprobe={nprobe}": {t: [round(e[f"knn_ivf_p{nprobe}"]["speedup_vs_knn_flat"], 2),
                                     round(e[f"knn_ivf_p{nprobe}"]["mse_vs_knn_flat_mse"], 2)]
                                 for t, e in result["per_t"].items()} for nprobe in probes},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
