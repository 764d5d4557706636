"""Estimator throughput and error on CIFAR-10-sized data, printed as JSON.

    python benchmarks/bench_estimators.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--threads 2]
    python benchmarks/bench_estimators.py --synthetic 5000          # random data, any machine
    python benchmarks/bench_estimators.py --device cuda             # on a GPU (torch index, faiss-gpu if any)

For batches of ``--batch`` queries z = x + t * eps at each t: the bare flat search (faiss on CPU, the
torch index on CUDA), the whole ``knn`` estimator on it, ``knn`` on every approximate proposal in
``--methods`` (speed-up over flat ``knn`` and MSE against ``exact`` relative to flat ``knn``'s: the
speed / error front), ``exact`` (achieved GFLOP/s as a fraction of the matmul peak: the best float32
GEMM rate over ``exact``'s own products and larger ones, timed in the same round-robin, so nothing
measured exceeds it: ``common.MatmulPeak``) and ``stf``. All times of one t are measured
interleaved, best of ``--repeats``, so machine load hits them alike; MSEs average ``--mse-repeats``
draws. ``os.getloadavg()`` is recorded at start and end. Times are this machine's; the ratios of one
run (``targets``) are what carries to another machine.

Approximate methods (``--methods``): ``ivf:NLIST:NPROBE`` (faiss IVF), ``pca:M:RERANK`` (torch
search over M principal components, then exact distances for the RERANK best), ``ivfpca:M:NLIST:NPROBE:RERANK``
(faiss IVF over the M components, then the rerank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulPeak, interleaved_seconds, machine, peak_rss_gb

from knn_cm.data import DataStore, load_image_folder
from knn_cm.estimators import make_estimator
from knn_cm.estimators.exact import _query_chunks
from knn_cm.search import build_index

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Peak probes besides exact's own products: large squares and the earlier set's wide shapes
# (--peak-shapes default), or small ones that keep the tests fast (small).
PEAK_SHAPES = {"default": [(4096, 4096, 4096, "b.T"), (2048, 2048, 2048, "b.T"), (2048, 2048, 2048, "b"),
                           (1024, 3072, 8192, "b.T")],
               "small": [(256, 256, 256, "b.T"), (64, 3072, 2048, "b.T")]}
DEFAULT_METHODS = ["ivf:1024:4", "ivf:1024:16", "pca:64:512", "ivfpca:64:1024:16:512", "ivfpca:64:1024:64:512"]


def build_method(store, method: str, device):
    """(name, index) for a --methods entry."""
    kind, *values = method.split(":")
    values = [int(v) for v in values]
    if kind == "ivf":
        nlist, nprobe = values
        return f"ivf_n{nlist}_p{nprobe}", build_index(store, "ivf", nlist=min(nlist, len(store) // 39), nprobe=nprobe)
    if kind == "pca":
        dim, rerank = values
        return f"pca{dim}_r{rerank}", build_index(store, "torch", project_dim=dim, rerank=rerank or None, device=device)
    if kind == "ivfpca":
        dim, nlist, nprobe, rerank = values
        nlist = min(nlist, len(store) // 39)
        return (f"ivfpca{dim}_n{nlist}_p{nprobe}_r{rerank}",
                build_index(store, "ivf", nlist=nlist, nprobe=min(nprobe, nlist), project_dim=dim,
                            rerank=rerank or None))
    raise ValueError(f"unknown method {method!r}: use ivf:NLIST:NPROBE, pca:M:RERANK or ivfpca:M:NLIST:NPROBE:RERANK")


def rate(seconds: float, batch: int, flops: float | None = None) -> dict:
    out = {"ms_per_query": 1e3 * seconds / batch, "queries_per_s": batch / seconds}
    if flops is not None:
        out["gflops"] = flops / seconds / 1e9
    return out


def exact_gemm_shapes(batch: int, size: int, dim: int, dtype=torch.float32) -> list:
    """The two products ``exact`` runs per query chunk, as MatmulPeak shapes: distances z [B, d] x rows.T
    (``distances.exact_log_likelihoods``) and weights [B, N] x rows [N, d] (``snis.weights_times_rows``),
    with B its query chunk and N its row chunk (65,536)."""
    start, stop = _query_chunks(batch, size, dtype)[0]
    rows = min(size, 1 << 16)
    return [(stop - start, dim, rows, "b.T"), (stop - start, rows, dim, "b")]


def mean_mse(estimator, z, t, x, reference, repeats, generator) -> float:
    draws = estimator.repeated(z, t, repeats, x=x, generator=generator)
    return (draws - reference.unsqueeze(0)).square().mean().item()


def load_store(args) -> DataStore:
    if args.synthetic:
        images = np.random.default_rng(args.seed).integers(0, 256, (args.synthetic, 3, 32, 32), dtype=np.uint8)
        return DataStore.from_array(images, name=f"synthetic{args.synthetic}")
    if not Path(args.data).exists():
        sys.exit(f"--data {args.data} does not exist; pass --data PATH or --synthetic N")
    return load_image_folder(args.data, subfolder="train", progress=False)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 image folder or archive (train/)")
    parser.add_argument("--synthetic", type=int, default=0, help="use N random 3x32x32 images instead of --data")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--times", type=float, nargs="+", default=[0.002, 1.0, 2.0, 5.0, 10.0, 20.0, 80.0])
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="approximate proposals to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mse-repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-shapes", default="default", choices=sorted(PEAK_SHAPES),
                        help="probes besides exact's own products: 'default' or 'small' (tests)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    device = torch.device(args.device)
    store = load_store(args)
    size, dim, batch = len(store), store.dim, args.batch
    peak = MatmulPeak(exact_gemm_shapes(batch, size, dim) + PEAK_SHAPES[args.peak_shapes], device)
    if device.type == "cuda":
        flat = build_index(store, "torch", device=device)
        flats = {"torch": flat}
        if hasattr(faiss, "StandardGpuResources"):  # machine() records which
            flats["faiss_gpu"] = build_index(store, "flat", device=device)
        flats["faiss_cpu"] = build_index(store, "flat", device="cpu")
    else:
        flat = build_index(store, "flat")
        flats = {"faiss_cpu": flat, "torch": build_index(store, "torch")}
    build_start = time.perf_counter()
    methods = dict(build_method(store, method, device) for method in args.methods)
    build_s = time.perf_counter() - build_start

    estimators = {"knn_flat": make_estimator("knn", store, index=flat, k=args.k, n=args.n, device=device)}
    if device.type == "cpu":  # knn on the torch index too, against its own bare search
        estimators["knn_torch"] = make_estimator("knn", store, index=flats["torch"], k=args.k, n=args.n)
    for name, index in methods.items():
        estimators[f"knn_{name}"] = make_estimator("knn", store, index=index, k=args.k, n=args.n, device=device)
    estimators["stf"] = make_estimator("stf", store, n=args.n, device=device)
    exact = make_estimator("exact", store, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cpu_generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, size, (batch,), generator=cpu_generator)
    x = store.float(ids).to(device)
    eps = torch.randn(x.shape, generator=cpu_generator).to(device)

    result = {
        "command": "python benchmarks/bench_estimators.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(args.threads),
        "data": {"name": store.name, "N": size, "d": dim},
        "settings": {"batch": batch, "k": args.k, "n": args.n, "repeats": args.repeats,
                     "mse_repeats": args.mse_repeats, "device": str(device), "methods": list(methods),
                     "approximate_build_s": build_s},
        "matmul_peak": None,  # filled in after every t: the peak is the best over all rounds
        "per_t": {},
    }
    for t in args.times:
        z = x + t * eps
        zf = z.reshape(batch, -1)
        reference = exact(z, t)
        functions = {f"search_{name}": (lambda index=index, zf=zf: index.search(zf, args.k))
                     for name, index in flats.items()}
        functions |= {name: (lambda est=est, z=z, t=t: est(z, t, x=x, generator=generator))
                      for name, est in estimators.items()}
        functions["exact"] = lambda z=z, t=t: exact(z, t)
        functions |= peak.functions()
        seconds = interleaved_seconds(functions, args.repeats, device)
        peak.record(seconds, args.repeats)
        seconds = {name: value for name, value in seconds.items() if not name.startswith("gemm_")}
        search_name = "search_torch" if device.type == "cuda" else "search_faiss_cpu"
        entry = {name: rate(value, batch, 4 * batch * size * dim if name == "exact" else None)
                 for name, value in seconds.items()}
        peak.observe(f"exact_t{t:g}", entry["exact"]["gflops"])
        entry["search"] = entry[search_name]
        knn_flat = entry["knn_flat"]
        knn_flat["cost_vs_flat_search"] = seconds["knn_flat"] / seconds[search_name]
        if "knn_torch" in entry:
            entry["knn_torch"]["cost_vs_own_search"] = seconds["knn_torch"] / seconds["search_torch"]
        if "search_faiss_cpu" in seconds:
            entry["search_torch"]["speedup_vs_faiss_cpu"] = seconds["search_faiss_cpu"] / seconds["search_torch"]
        flat_mse = mean_mse(estimators["knn_flat"], z, t, x, reference, args.mse_repeats, generator)
        knn_flat["mse_vs_exact"] = flat_mse
        for name in methods:
            method = entry[f"knn_{name}"]
            method["mse_vs_exact"] = mean_mse(estimators[f"knn_{name}"], z, t, x, reference, args.mse_repeats,
                                              generator)
            method["speedup_vs_knn_flat"] = seconds["knn_flat"] / seconds[f"knn_{name}"]
            # Both are exact to rounding (~1e-15) where the posterior is a point mass: floor the divisor.
            method["mse_vs_knn_flat_mse"] = method["mse_vs_exact"] / max(flat_mse, 1e-12)
        stf_estimate = estimators["stf"](z, t, x=x, generator=generator)
        entry["stf"]["mse_vs_exact"] = (stf_estimate - reference).square().mean().item()
        result["per_t"][f"{t:g}"] = entry
        print(f"t={t:g}: knn/search {knn_flat['cost_vs_flat_search']:.3f}", file=sys.stderr, flush=True)

    per_t = result["per_t"]
    result["matmul_peak"] = peak.result()
    for entry in per_t.values():
        entry["exact"]["fraction_of_peak"] = entry["exact"]["gflops"] / result["matmul_peak"]["gflops"]
    result["targets"] = {
        "knn_vs_flat_search_per_t (target <= 1.10)": {t: round(e["knn_flat"]["cost_vs_flat_search"], 3)
                                                      for t, e in per_t.items()},
        "knn_vs_flat_search_max": max(e["knn_flat"]["cost_vs_flat_search"] for e in per_t.values()),
        "knn_on_torch_index_vs_its_search_per_t": {t: round(e["knn_torch"]["cost_vs_own_search"], 3)
                                                   for t, e in per_t.items() if "knn_torch" in e},
        "exact_fraction_of_peak_min": min(e["exact"]["fraction_of_peak"] for e in per_t.values()),
        "exact_fraction_of_peak_max": max(e["exact"]["fraction_of_peak"] for e in per_t.values()),
        "torch_search_speedup_vs_faiss_cpu_per_t": {t: round(e["search_torch"]["speedup_vs_faiss_cpu"], 2)
                                                    for t, e in per_t.items()
                                                    if "speedup_vs_faiss_cpu" in e["search_torch"]},
        "approximate_front_speedup_and_mse_ratio_per_t": {
            name: {t: [round(e[f"knn_{name}"]["speedup_vs_knn_flat"], 2),
                       round(e[f"knn_{name}"]["mse_vs_knn_flat_mse"], 2)]
                   for t, e in per_t.items()} for name in methods},
    }
    result["peak_rss_gb"] = peak_rss_gb()
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
