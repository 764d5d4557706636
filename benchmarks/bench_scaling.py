"""Cost growth with N: per-query time of flat and approximate ``knn``, peak memory, error, printed as JSON.

    python benchmarks/bench_scaling.py [--sizes 50000 100000 200000 500000 1000000] [--plot docs/figures/scaling.png]

Data: CIFAR-10-like images with the cluster structure of real ones (``common.cifar_like_images``: a
Gaussian mixture fitted to the CIFAR-10 train set's top 256 principal components and 1,000 k-means
cells, plus residual noise), generated once for the largest N into a ``.npy`` file and memory-mapped;
each N uses its first N images in a fresh subprocess (so each peak resident memory is its own). Per N:
build times, ``knn`` per-query time on the flat (torch) index and on each approximate index (interleaved,
best of ``--repeats``, at ``--timing-t``), their MSE against ``exact`` at each of ``--times`` (at the N in
``--mse-sizes``, default all: the ``exact`` reference costs two passes over the data per t), and the
process's peak resident memory. A second subprocess per N holds only the store and the flat index and
runs one ``knn`` call (search, draws, weights): its peak resident memory is what searching the store
costs, without the approximate indexes' training or the ``exact`` reference. Then fitted exponents
(per-query time ~ N^a, least squares in log-log), the smallest N at which each approximate method is at
least 10x faster than flat, and where between the measured N the 10x crossing lies (log-log
interpolation of the speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_METHODS = ["pca:64:512", "ivfpca:64:0:0:512"]  # the second is configs/train/index/approximate.yaml


def _mapped_store(args):
    """(the first N generated images, memory-mapped; a DataStore over them), with torch on ``--threads``."""
    import torch

    from knn_cm.data import DataStore

    torch.set_num_threads(args.threads)
    images = np.load(args.images, mmap_mode="r")[: args.size]
    return images, DataStore.from_array(images, name=f"cifar_like{args.size}")


def run_one(args) -> dict:
    """One N, in this process: the measurements of the module docstring."""
    import faiss
    import torch
    from common import interleaved_seconds, machine, peak_rss_gb

    from knn_cm.estimators import make_estimator
    from knn_cm.search import build_index

    faiss.omp_set_num_threads(args.threads)
    images, store = _mapped_store(args)
    started = time.perf_counter()
    flat = build_index(store, "torch")
    out = {"N": args.size, "machine": machine(args.threads), "storage_bytes": flat.rows.storage_bytes,
           "storage": "mapped" if flat.rows.rows.data_ptr() == torch.from_numpy(np.asarray(images)).data_ptr()
           else str(flat.rows.rows.dtype), "flat_build_s": time.perf_counter() - started}
    indexes = {"flat": flat}
    for method in args.methods:
        kind, *values = method.split(":")
        started = time.perf_counter()
        if kind == "pca":  # torch search over the projected vectors, exact rerank
            dim, rerank = values
            index = build_index(store, "torch", project_dim=int(dim), rerank=int(rerank) or None)
            name = f"pca{dim}_r{rerank}"
        else:
            dim, nlist, nprobe, rerank = values
            index = build_index(store, "ivf", nlist=int(nlist) or None, nprobe=int(nprobe) or None,
                                project_dim=int(dim), rerank=int(rerank) or None)
            name = f"ivfpca{dim}_n{nlist if int(nlist) else 'auto'}_p{nprobe if int(nprobe) else 'auto'}_r{rerank}"
        indexes[name] = index
        out[f"{name}_build_s"] = time.perf_counter() - started
        out[f"{name}_nlist"] = index.spec.nlist
    estimators = {name: make_estimator("knn", store, index=index, k=args.k, n=args.n)
                  for name, index in indexes.items()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(store), (args.batch,), generator=generator)
    x = store.float(ids)
    eps = torch.randn(x.shape, generator=generator)
    z = x + args.timing_t * eps
    seconds = interleaved_seconds({name: (lambda e=e: e(z, args.timing_t, generator=generator))
                                   for name, e in estimators.items()}, args.repeats)
    out["ms_per_query"] = {name: 1e3 * s / args.batch for name, s in seconds.items()}
    out["speedup_vs_flat"] = {name: seconds["flat"] / s for name, s in seconds.items() if name != "flat"}
    exact = make_estimator("exact", store)
    out["mse_vs_exact"] = {}
    for t in args.times if args.mse else []:
        zt = x + t * eps
        reference = exact(zt, t)
        out["mse_vs_exact"][f"{t:g}"] = {
            name: (e.repeated(zt, t, args.mse_repeats, generator=generator) - reference).square().mean().item()
            for name, e in estimators.items()}
    out["peak_rss_gb"] = peak_rss_gb()
    out["index_extra_bytes"] = {name: getattr(index, "memory_bytes", 0) for name, index in indexes.items()}
    out["loadavg_end"] = os.getloadavg()
    return out


def run_search_only(args) -> dict:
    """One N, in this process: the store (memory-mapped) and the flat torch index only, one ``knn`` call."""
    import torch
    from common import peak_rss_gb

    from knn_cm.estimators import make_estimator
    from knn_cm.search import build_index

    _, store = _mapped_store(args)
    index = build_index(store, "torch")
    estimator = make_estimator("knn", store, index=index, k=args.k, n=args.n)
    generator = torch.Generator().manual_seed(0)
    x = store.float(torch.randint(0, len(store), (args.batch,), generator=generator))
    z = x + args.timing_t * torch.randn(x.shape, generator=generator)
    started = time.perf_counter()
    estimator(z, args.timing_t, generator=generator)
    return {"N": args.size, "knn_call_s": time.perf_counter() - started, "storage_bytes": index.rows.storage_bytes,
            "rows_held_as": str(index.rows.rows.dtype), "peak_rss_gb": peak_rss_gb()}


def crossing_10x(sizes, speedups) -> float | None:
    """N at which the speed-up first reaches 10, interpolated log-log between the bracketing sizes."""
    for (n0, s0), (n1, s1) in zip(zip(sizes, speedups), zip(sizes[1:], speedups[1:])):
        if s0 < 10 <= s1:
            fraction = (np.log(10) - np.log(s0)) / (np.log(s1) - np.log(s0))
            return float(np.exp(np.log(n0) + fraction * (np.log(n1) - np.log(n0))))
    return None


def make_images(path: Path, count: int, data: str, seed: int) -> dict:
    from common import cifar_like_images

    from knn_cm.data import load_image_folder

    reference = load_image_folder(data, subfolder="train", progress=False).images
    started = time.perf_counter()
    images = cifar_like_images(count, np.asarray(reference), seed=seed)
    np.save(path, images)
    return {"generated": count, "seconds": time.perf_counter() - started, "path": str(path),
            "recipe": "Gaussian mixture on CIFAR-10 train: top 256 principal components, 1,000 k-means cells "
                      "(per-cell mean and per-component std), isotropic residual noise, rounded to uint8"}


def fit_exponent(sizes, values) -> float:
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    sizes = [run["N"] for run in runs]
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for name in runs[0]["ms_per_query"]:
        values = [run["ms_per_query"][name] for run in runs]
        axis.loglog(sizes, values, "o-", label=f"knn {name} (N^{result['exponents'][name]:.2f})")
    axis.set_xlabel("N (elements)")
    axis.set_ylabel("ms per query")
    settings = result["settings"]
    axis.set_title(f"knn per-query cost, k {settings['k']}, n {settings['n']}, t {settings['timing_t']:g}")
    axis.legend(fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000, 500_000, 1_000_000])
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS,
                        help="ivfpca:M:NLIST:NPROBE:RERANK (faiss IVF over M components; NLIST or NPROBE 0: "
                             "the defaults 4 sqrt(N) and NLIST / 16) or pca:M:RERANK (torch)")
    parser.add_argument("--images", default="/tmp/knn_cm_scaling_images.npy", help="generated data (reused if present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--timing-t", type=float, default=5.0)
    parser.add_argument("--times", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0, 80.0])
    parser.add_argument("--mse-sizes", type=int, nargs="*", default=None,
                        help="the N at which MSEs against exact are measured (default: every N)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mse-repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the log-log plot here")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child mode: N
    parser.add_argument("--search-only", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--no-mse", dest="mse", action="store_false", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.one:
        args.size = args.one
        print(json.dumps(run_search_only(args) if args.search_only else run_one(args)))
        return {}
    images = Path(args.images)
    generation = None
    if not images.exists() or np.load(images, mmap_mode="r").shape[0] < max(args.sizes):
        generation = make_images(images, max(args.sizes), args.data, args.seed)
    result = {"command": "python benchmarks/bench_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "data": generation or {"path": str(images), "reused": True},
              "settings": {key: getattr(args, key) for key in ("batch", "k", "n", "timing_t", "times", "repeats",
                                                               "mse_repeats", "threads", "methods")},
              "runs": []}
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    for size in args.sizes:
        child = [sys.executable, __file__, "--one", str(size), "--images", str(images)]
        for key in ("threads", "batch", "k", "n", "timing_t", "repeats", "mse_repeats"):
            child += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        child += ["--times", *map(str, args.times), "--methods", *args.methods]
        if args.mse_sizes is not None and size not in args.mse_sizes:
            child.append("--no-mse")
        search_only = subprocess.run(child + ["--search-only"], check=True, capture_output=True, text=True,
                                     env=environment)
        output = subprocess.run(child, check=True, capture_output=True, text=True, env=environment)
        run = json.loads(output.stdout.strip().splitlines()[-1])
        run["search_only"] = json.loads(search_only.stdout.strip().splitlines()[-1])
        result["runs"].append(run)
        print(f"N={size}: {run['ms_per_query']} peak {run['peak_rss_gb']:.2f} GB, search only "
              f"{run['search_only']['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    sizes = [run["N"] for run in result["runs"]]
    names = list(result["runs"][0]["ms_per_query"])
    if len(sizes) > 1:
        result["exponents"] = {name: fit_exponent(sizes, [run["ms_per_query"][name] for run in result["runs"]])
                               for name in names}
    result["smallest_N_with_10x"] = {
        name: next((run["N"] for run in result["runs"] if run["speedup_vs_flat"][name] >= 10), None)
        for name in names if name != "flat"}
    result["interpolated_N_at_10x"] = {
        name: crossing_10x(sizes, [run["speedup_vs_flat"][name] for run in result["runs"]])
        for name in names if name != "flat"}
    largest = result["runs"][-1]
    measured = [run for run in result["runs"] if run["mse_vs_exact"]]
    largest_mse = measured[-1] if measured else largest
    result["targets_at_largest_N"] = {
        "N": largest["N"],
        "speedup_vs_flat (target >= 10)": largest["speedup_vs_flat"],
        "mse_N": largest_mse["N"],
        "mse_ratio_vs_flat_per_t (target <= 2 at t >= 2)": {
            name: {t: round(v[name] / max(v["flat"], 1e-12), 2) for t, v in largest_mse["mse_vs_exact"].items()}
            for name in names if name != "flat"},
        "approximate_exponent (target <= 0.5)": {n: e for n, e in result.get("exponents", {}).items() if n != "flat"},
        "search_only_peak_rss_gb (target: a 1M x 3072 store searches within 6 GB)":
            largest["search_only"]["peak_rss_gb"],
        "whole_benchmark_peak_rss_gb (approximate indexes and exact reference included)": largest["peak_rss_gb"],
    }
    if args.plot and len(sizes) > 1:
        plot(result, Path(args.plot))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
