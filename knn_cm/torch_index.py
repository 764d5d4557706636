"""A torch-native nearest-neighbour index: chunked matrix products and top-k on any device, no faiss.

``TorchIndex`` (index kind ``torch``) searches a store's resident rows (:mod:`knn_cm.data.resident`: they
may stay uint8, even memory-mapped, and are converted a chunk at a time) by the GEMM expansion
||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, a top-k per chunk of rows and a running merge, so memory is
bounded by the chunk sizes and not by N. Exact in float32 (the same neighbours as faiss ``flat`` up to
distance ties); float16 / bfloat16 search precision only shapes the KNN proposal: the estimator's
importance weights are computed from exact float32 distances of the drawn elements (Eq. 11).

With a :class:`Projection` it is an approximate (two-stage) search: stage 1 ranks all elements in a
PCA-reduced space (m principal components plus one coordinate holding the norm of each element's
residual, so reduced distances add ||(I - P) x||^2), stage 2 recomputes exact distances for the ``rerank``
best candidates and keeps the k nearest. Any candidate set keeps the KNN estimator consistent: the
proposal (Eq. 13) still covers every element (the tail), and the weights use exact distances.

Every search step has fixed shapes and no value-dependent branch: on CUDA a search never synchronises
with the host.
"""

from __future__ import annotations

import numpy as np
import torch

from knn_cm.data.resident import ResidentRows
from knn_cm.estimators.base import isolated_numerics
from knn_cm.sorting import sort_rows

SEARCH_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Rows converted (uint8 -> search dtype) and multiplied per matrix product: bounds temporary memory.
CONVERT_ROWS = 8192
# Bytes allowed for one block of distances [queries, chunk rows] before its top-k.
DISTANCE_BUDGET = 128 << 20


def default_chunk_rows(device: torch.device) -> int:
    """Rows per top-k step: fewer kernel launches on GPU, cache-friendlier on CPU."""
    return 1 << 18 if device.type == "cuda" else 1 << 16


def check_precision(precision: str) -> torch.dtype:
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(SEARCH_PRECISIONS)}, got {precision!r}")
    return SEARCH_PRECISIONS[precision]


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


def exact_sq_dists(queries: torch.Tensor, rows: ResidentRows, indices: torch.Tensor,
                   gather_rows: int = 2048) -> torch.Tensor:
    """||q_b - x_{indices[b, j]}||^2 [B, r] in float32 by batched products on gathered rows.

    Rows are gathered ``gather_rows`` at a time into the rows' reused scratch buffer: on a loaded CPU a
    fresh 100 MB gather per step cost 4-30x more (page faults, cache misses) than a cache-sized reused one.
    """
    out = torch.empty(indices.shape, dtype=torch.float32, device=queries.device)
    q_sq = queries.square().sum(1)
    norms = rows.sq_norms.to(torch.float32)
    query_step = max(1, gather_rows // max(1, indices.shape[1]))
    for start in range(0, queries.shape[0], query_step):
        ids = indices[start : start + query_step]
        gathered = rows.gather_scratch(ids.reshape(-1)).view(*ids.shape, -1)
        q = queries[start : start + query_step].to(gathered.dtype)
        dots = torch.bmm(q.unsqueeze(1), gathered.transpose(1, 2)).squeeze(1).to(torch.float32)
        out[start : start + query_step] = (norms[ids] - 2.0 * dots + q_sq[start : start + query_step].unsqueeze(1)).clamp_(min=0.0)
    return out


class Projection:
    """PCA to m dimensions plus a residual-norm coordinate: ||q' - x'||^2 = ||P(q - x)||^2 + ||(I - P) x||^2.

    Adding the query's own residual ||(I - P)(q - mu)||^2 makes the reduced distance an estimate of
    ||q - x||^2 that misses only the cross term -2 (I - P) q . (I - P) x.

    Attributes:
        mean: [d] float32; basis: [d, m] float32 (orthonormal columns, top principal components).
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor):
        self.mean = mean
        self.basis = basis

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    @classmethod
    def fit(cls, rows: ResidentRows, dim: int, train_size: int, seed: int, iterations: int = 6) -> "Projection":
        """Top ``dim`` principal components of ``train_size`` elements drawn with ``seed`` (float64).

        Randomised subspace iteration (``iterations`` power steps on dim + 16 vectors, seeded), then an
        exact eigendecomposition within that subspace: a few products with the sample instead of a
        d x d eigendecomposition (seconds at d = 12,288 instead of minutes).
        """
        if not 1 <= dim < rows.dim:
            raise ValueError(f"project_dim must be in [1, d={rows.dim}), got {dim}")
        generator = np.random.default_rng(seed)
        sample_ids = np.sort(generator.choice(rows.size, size=min(train_size, rows.size), replace=False))
        sample = rows.gather(torch.from_numpy(sample_ids).to(rows.device)).to(torch.float64)
        mean = sample.mean(0)
        centred = sample - mean
        width = min(dim + 16, rows.dim, centred.shape[0])
        start = torch.from_numpy(generator.standard_normal((rows.dim, width))).to(centred)
        subspace = torch.linalg.qr(centred.T @ (centred @ start)).Q
        for _ in range(iterations):
            subspace = torch.linalg.qr(centred.T @ (centred @ subspace)).Q
        reduced = centred @ subspace
        _, vectors = torch.linalg.eigh(reduced.T @ reduced)  # ascending eigenvalues
        basis = (subspace @ vectors)[:, -dim:].flip(1)
        # Fix each component's sign (largest entry positive), so a refit gives the same basis.
        signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        basis = basis * signs
        return cls(mean.to(torch.float32), basis.to(torch.float32).contiguous())

    def to(self, device: torch.device) -> "Projection":
        return Projection(self.mean.to(device), self.basis.to(device))

    def project_rows(self, rows: ResidentRows, chunk_rows: int = 8192) -> torch.Tensor:
        """[N, m + 1] float32: P(x - mu) and ||(I - P)(x - mu)||, in IEEE float32 products (no TF32)."""
        out = torch.empty(rows.size, self.dim + 1, dtype=torch.float32, device=rows.device)
        with isolated_numerics(rows.device):
            for start, chunk in rows.chunks(chunk_rows):
                reduced, residual = self._split(chunk.to(torch.float32))
                out[start : start + chunk.shape[0], :-1] = reduced
                out[start : start + chunk.shape[0], -1] = residual.sqrt()
        return out

    def project_queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, m + 1] with a zero residual coordinate, ||(I - P)(q - mu)||^2 [B])."""
        reduced, residual = self._split(queries)
        return torch.cat([reduced, torch.zeros_like(reduced[:, :1])], dim=1), residual

    def _split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = values - self.mean
        reduced = centred @ self.basis
        residual = (centred.double().square().sum(1) - reduced.double().square().sum(1)).clamp_(min=0.0)
        return reduced, residual.to(torch.float32)


class TorchIndex:
    """Index kind ``torch``: exhaustive (or two-stage projected) search in torch on any device.

    Args:
        rows: the store's resident rows on the search device (shared with the estimators).
        spec: the resolved :class:`~knn_cm.index.IndexSpec` (precision, project_dim, rerank).
        data_fingerprint: the store's fingerprint.
        projection: a fitted :class:`Projection` when ``spec.project_dim`` is set.
        chunk_rows: rows per top-k step (default :func:`default_chunk_rows`).
    """

    def __init__(self, rows: ResidentRows, spec, data_fingerprint: str, projection: Projection | None = None,
                 chunk_rows: int | None = None):
        self.rows = rows
        self.spec = spec
        self.data_fingerprint = data_fingerprint
        self.device = rows.device
        self.size = rows.size
        self.dim = rows.dim
        self.precision = check_precision(spec.precision)
        self.chunk_rows = chunk_rows
        self.projection = projection
        self.reduced_rows = None
        if projection is not None:
            self.projection = projection.to(self.device)
            self.reduced_rows = ResidentRows(self.projection.project_rows(rows), torch.float32, data_fingerprint)

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
        """Bytes held beyond the shared resident rows (the reduced vectors of a projected index)."""
        return 0 if self.reduced_rows is None else self.reduced_rows.storage_bytes

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest elements of each query: (sq_dists float32 [B, k'], indices int64 [B, k']), nearest first.

        Queries [B, d] (or [B, C, H, W]) are moved to the index's device; results stay there
        (k' = min(k, N)). Projected searches return the exact distances of reranked candidates and
        reduced-space estimates for the others.
        """
        from knn_cm.index import check_search_input

        queries, k = check_search_input(queries, k, self.dim, self.size)
        queries = queries.detach().to(device=self.device, dtype=torch.float32)
        # The distances are GEMM expansions: IEEE float32 products whatever the caller set (no TF32).
        with isolated_numerics(self.device):
            return self._search(queries, k)

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.projection is None:
            return chunked_topk(queries, self.rows, k, self.precision, self.chunk_rows)
        reduced_queries, residual = self.projection.project_queries(queries)
        candidates = min(self.size, max(k, self.spec.rerank or 0))
        dists, indices = chunked_topk(reduced_queries, self.reduced_rows, candidates, self.precision, self.chunk_rows)
        dists = dists + residual.unsqueeze(1)
        reranked = min(self.spec.rerank or 0, candidates)
        if reranked == 0:
            return dists[:, :k], indices[:, :k]
        exact = exact_sq_dists(queries, self.rows, indices[:, :reranked])
        if reranked < candidates:
            # Exact distances for the reranked head, reduced-space estimates for the rest.
            exact = torch.cat([exact, dists[:, reranked:]], dim=1)
        dists, order = exact.topk(k, dim=1, largest=False, sorted=True)
        return dists, indices.gather(1, order)

    def check_data(self, store) -> None:
        from knn_cm.index import check_index_data

        check_index_data(self, store)


def _ranges(total: int, step: int):
    return [(start, min(start + step, total)) for start in range(0, total, step)]


__all__ = ["Projection", "SEARCH_PRECISIONS", "TorchIndex", "chunked_topk", "exact_sq_dists"]
