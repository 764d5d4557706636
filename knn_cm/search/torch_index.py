"""A torch-native nearest-neighbour index: chunked matrix products and top-k on any device, no faiss.

``TorchIndex`` (index kind ``torch``) searches a store's resident rows (:mod:`knn_cm.data.resident`: they
may stay uint8, even memory-mapped, and are converted a chunk at a time) by the GEMM expansion
||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, a top-k per chunk of rows and a running merge, so memory is
bounded by the chunk sizes and not by N. Exact in float32 (the same neighbours as faiss ``flat`` up to
distance ties); float16 / bfloat16 search precision only shapes the KNN proposal: the estimator's
importance weights are computed from exact float32 distances of the drawn elements (Eq. 11).

A projected (two-stage) search wraps it: :mod:`knn_cm.search.two_stage`.

Every search step has fixed shapes and no value-dependent branch: on CUDA a search never synchronises
with the host.
"""

from __future__ import annotations

import torch

from knn_cm.data.resident import ResidentRows
from knn_cm.numerics import isolated_numerics
from knn_cm.search.sorting import sort_rows
from knn_cm.search.spec import check_index_data, check_precision, check_search_input

# Rows converted (uint8 -> search dtype) and multiplied per matrix product: bounds temporary memory.
CONVERT_ROWS = 8192
# Bytes allowed for one block of distances [queries, chunk rows] before its top-k.
DISTANCE_BUDGET = 128 << 20


def default_chunk_rows(device: torch.device) -> int:
    """Rows per top-k step: fewer kernel launches on GPU, cache-friendlier on CPU."""
    return 1 << 18 if device.type == "cuda" else 1 << 16


def chunked_topk(queries: torch.Tensor, rows: ResidentRows, k: int, precision: torch.dtype = torch.float32,
                 chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of each query by squared L2 distance, exhaustively.

    Args:
        queries: [B, d] float32 on ``rows.device``.
        rows: the N rows to search (any storage).
        k: neighbours per query, 1 <= k <= N.
        precision: dtype of the matrix products. In float16 / bfloat16 the queries are scaled to unit
            norm first, so q.x stays within |x| (no float16 overflow for any sigma); distances are
            assembled in float32.
        chunk_rows: rows per top-k step (default :func:`default_chunk_rows`).

    Returns:
        (sq_dists float32 [B, k], indices int64 [B, k]), nearest first.
    """
    chunk_rows = max(k, chunk_rows or default_chunk_rows(rows.device))
    batch = queries.shape[0]
    query_step = max(1, DISTANCE_BUDGET // (4 * chunk_rows))
    out_dists, out_indices = [], []
    for q_start in range(0, batch, query_step):
        q = queries[q_start : q_start + query_step]
        q_sq = q.square().sum(1)
        if precision == torch.float32:
            scale, q_search = None, q
        else:
            scale = q.norm(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
            q_search = (q / scale.unsqueeze(1)).to(precision)
        best_dists = best_indices = None
        dists = torch.empty(q.shape[0], chunk_rows, dtype=torch.float32, device=q.device)
        products = torch.empty(q.shape[0], CONVERT_ROWS, dtype=torch.float32, device=q.device)
        for start, stop in _ranges(rows.size, chunk_rows):
            block = dists[:, : stop - start]
            for sub_start, sub_stop in _ranges(stop - start, CONVERT_ROWS):
                chunk = rows_in(rows, start + sub_start, start + sub_stop, precision)
                if scale is None:  # straight into the distance block: no fresh product tensor per step
                    torch.mm(q_search, chunk.T, out=products[:, : sub_stop - sub_start])
                    block[:, sub_start:sub_stop] = products[:, : sub_stop - sub_start]
                else:
                    block[:, sub_start:sub_stop] = (q_search @ chunk.T).float().mul_(scale.unsqueeze(1))
            norms = rows.sq_norms[start:stop].to(torch.float32)
            block.mul_(-2.0).add_(norms.unsqueeze(0)).add_(q_sq.unsqueeze(1)).clamp_(min=0.0)
            values, local = block.topk(min(k, stop - start), dim=1, largest=False, sorted=False)
            local = local + start
            if best_dists is None:
                best_dists, best_indices = values, local
            else:
                merged_dists = torch.cat([best_dists, values], dim=1)
                merged_indices = torch.cat([best_indices, local], dim=1)
                best_dists, pick = merged_dists.topk(k, dim=1, largest=False, sorted=False)
                best_indices = merged_indices.gather(1, pick)
        best_dists, order = sort_rows(best_dists)
        out_dists.append(best_dists)
        out_indices.append(best_indices.gather(1, order))
    return torch.cat(out_dists), torch.cat(out_indices)


def rows_in(rows: ResidentRows, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) as ``dtype`` values in [-1, 1] (converted from the stored bytes directly; x-flipped
    elements mirrored on the fly, as :meth:`~knn_cm.data.resident.ResidentRows.raw_range` makes them)."""
    raw = rows.raw_range(start, stop)
    if raw.dtype == torch.uint8:
        return raw.to(dtype).div_(127.5).sub_(1.0)
    return raw.to(dtype)


class TorchIndex:
    """Index kind ``torch``: exhaustive (or two-stage projected) search in torch on any device.

    Args:
        rows: the store's resident rows on the search device (shared with the estimators).
        spec: the resolved :class:`~knn_cm.search.spec.IndexSpec` (its precision).
        data_fingerprint: the store's fingerprint.
        chunk_rows: rows per top-k step (default :func:`default_chunk_rows`).
    """

    def __init__(self, rows: ResidentRows, spec, data_fingerprint: str, chunk_rows: int | None = None):
        self.rows = rows
        self.spec = spec
        self.data_fingerprint = data_fingerprint
        self.device = rows.device
        self.size = rows.size
        self.dim = rows.dim
        self.precision = check_precision(spec.precision)
        self.chunk_rows = chunk_rows

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def nprobe(self):
        return None

    def __repr__(self) -> str:
        return f"TorchIndex({self.spec}, N={self.size}, d={self.dim}, device={self.device})"

    @property
    def memory_bytes(self) -> int:
        """Bytes held beyond the shared resident rows: none."""
        return 0

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest elements of each query: (sq_dists float32 [B, k'], indices int64 [B, k']), nearest first.

        Queries [B, d] (or [B, C, H, W]) are moved to the index's device; results stay there (k' = min(k, N)).
        """
        queries, k = check_search_input(queries, k, self.dim, self.size)
        queries = queries.detach().to(device=self.device, dtype=torch.float32)
        # The distances are GEMM expansions: IEEE float32 products whatever the caller set (no TF32).
        with isolated_numerics(self.device):
            return chunked_topk(queries, self.rows, k, self.precision, self.chunk_rows)

    def result_device(self, queries: torch.Tensor) -> torch.device:
        """Results stay on the index's device."""
        return self.device

    def check_data(self, store) -> None:
        check_index_data(self, store)


def _ranges(total: int, step: int):
    return [(start, min(start + step, total)) for start in range(0, total, step)]
