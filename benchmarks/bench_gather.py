"""The floor of `knn`'s exact-weight stage: reading the drawn rows, printed as JSON.

    python benchmarks/bench_gather.py [--threads 2] [--N 50000] [--draws 256]

At large t the n draws of each query hit about n distinct rows, so ``snis_mean`` gathers
B x n rows of d float32 values (128 x 256 x 12 KB = 400 MB for CIFAR-10) and reads them twice: dot
products for the exact weights, then the weighted mean. Times, best of ``--repeats``: the whole
``snis_mean`` (its GEMM path, large sigma); its three steps alone (gather into a buffer, the
two batched products); and reading the same rows once straight from the store through a sparse
[B, N] x [N, d] product (no buffer), the least any method that touches every drawn row can cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_seconds, machine

from knn_cm.data import DataStore
from knn_cm.estimators.snis import snis_mean


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--N", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--draws", type=int, default=256, help="distinct rows per query")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.N, 3, 32, 32), dtype=torch.uint8, generator=generator).numpy()
    rows = DataStore.from_array(images, name=f"random{args.N}").resident(torch.device("cpu"), torch.float32, "float")
    batch, draws, dim = args.batch, args.draws, rows.dim
    ids = torch.stack([torch.randperm(args.N, generator=generator)[:draws] for _ in range(batch)])
    z = torch.randn(batch, dim, generator=generator)
    sigma = torch.full((batch,), 80.0)  # large sigma: the GEMM path of snis_mean
    log_weights = torch.randn(batch, draws, generator=generator)
    weights = torch.softmax(log_weights, dim=1)
    buffer = torch.empty(batch * draws, dim)
    gathered = buffer.view(batch, draws, dim)
    torch.index_select(rows.rows, 0, ids.reshape(-1), out=buffer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is "beta" in torch
        sparse = torch.sparse_csr_tensor(torch.arange(0, batch * draws + 1, draws), ids.reshape(-1),
                                         weights.reshape(-1), size=(batch, args.N))
    seconds = {
        "snis_mean": best_seconds(lambda: snis_mean(z, sigma, rows, ids, log_weights), args.repeats),
        "gather_into_buffer": best_seconds(lambda: torch.index_select(rows.rows, 0, ids.reshape(-1), out=buffer),
                                           args.repeats),
        "dots_bmm": best_seconds(lambda: torch.bmm(z.unsqueeze(1), gathered.transpose(1, 2)), args.repeats),
        "mean_bmm": best_seconds(lambda: torch.bmm(weights.unsqueeze(1), gathered), args.repeats),
        "rows_read_once_sparse_mean": best_seconds(lambda: sparse @ rows.rows, args.repeats),
    }
    megabytes = batch * draws * dim * 4 / 1e6
    result = {
        "command": "python benchmarks/bench_gather.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(args.threads),
        "settings": {"N": args.N, "d": dim, "batch": batch, "distinct_rows_per_query": draws},
        "rows_megabytes": megabytes,
        "ms_per_batch": {name: 1e3 * value for name, value in seconds.items()},
        "ms_per_query": {name: 1e3 * value / batch for name, value in seconds.items()},
        "read_once_gb_per_s": megabytes / 1e3 / seconds["rows_read_once_sparse_mean"],
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
