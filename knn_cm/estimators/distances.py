"""Squared distances ||z - x||^2 and the Gaussian log-likelihoods log p(z | x) built from them.

Two ways to get squared distances:
- GEMM expansion ||z||^2 - 2 z.x + ||x||^2 (:func:`gemm_sq_dists`): fast (matrix products) but in float32 its
  absolute error reaches several eps * (||z||^2 + ||x||^2), up to 1.7e-3 on CIFAR-10: about 200 nats at
  sigma = 0.002. :func:`refine_sq_dists` recomputes exactly the few elements whose weight that error could change.
- direct differences on gathered rows (:func:`sq_norms` of x - z): exact to rounding of the distance itself;
  used wherever the GEMM error could change a weight by more than :data:`TOLERANCE_EPS` eps nats (small sigma),
  both for refinement and for the elements an estimator draws (``knn_cm.estimators.snis``).
Log-likelihoods are measured from each query's nearest candidate (:func:`log_likelihood`), so sigma from
0.002 to 80 gives no overflow, underflow to all-zero, NaN or inf once they are normalised (softmax).
"""

from __future__ import annotations

import torch

from knn_cm.data.resident import ResidentRows

# Elements whose approximate log-weight lies more than this below the query's best are negligible
# (e^-40 ~ 4e-18 of the best element's weight), so their distances need no refinement.
WINDOW_NATS = 40.0
# GEMM distance error allowance in units of eps * (||z||^2 + ||x||^2); up to 4.4 seen on CIFAR-10.
GEMM_ERROR_FACTOR = 16.0
# A query's GEMM distances are refined when their error allowance exceeds this many eps of log-weight
# (0.012 nats in float32: then only below sigma ~ 0.8 on CIFAR-10, where the posterior is a point mass;
# weight errors of that size change no estimate measurably, and average out where many elements share
# the posterior).
TOLERANCE_EPS = 1e5
# At most this many elements per query are refined (its nearest, by GEMM distance).
MAX_REFINED = 256


def log_likelihood(sq_dist: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(z; x, sigma^2 I) up to a constant per query: -(||z - x||^2 - min_j ||z - x_j||^2) / (2 sigma^2).

    sq_dist [B, m] (+inf for absent entries), sigma [B] -> [B, m]. Constants cancel in every
    self-normalised weight; measuring from each query's nearest entry keeps that entry at 0, so the
    weights stay finite down to ``knn_cm.estimators.base.sigma_floor`` (where the plain form gives 0 / 0
    or all -inf).
    """
    nearest = sq_dist.amin(dim=-1, keepdim=True)
    return (sq_dist - nearest) / (-2.0 * sigma.reshape(-1, 1) ** 2)


def sq_norms(delta: torch.Tensor) -> torch.Tensor:
    """||delta||^2 over the last axis. vector_norm then square: several times faster than vecdot on a CPU,
    for a relative error of about 2 eps."""
    return torch.linalg.vector_norm(delta, dim=-1).square()


def gemm_sq_dists(z: torch.Tensor, rows: torch.Tensor, z_sq: torch.Tensor, rows_sq: torch.Tensor) -> torch.Tensor:
    """||z_b - x_j||^2 [B, m] by the GEMM expansion; z [B, d], rows [m, d], z_sq [B], rows_sq [m]."""
    sq = torch.addmm(rows_sq.unsqueeze(0), z, rows.T, alpha=-2.0)
    return sq.add_(z_sq.unsqueeze(1)).clamp_(min=0.0)


def gemm_slack(z_sq: torch.Tensor, max_row_sq: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Allowance [B] for the absolute error of :func:`gemm_sq_dists` in ``dtype``."""
    return GEMM_ERROR_FACTOR * torch.finfo(dtype).eps * (z_sq + max_row_sq)


def gemm_is_accurate(z_sq: torch.Tensor, sigma: torch.Tensor, max_row_sq: float | torch.Tensor) -> torch.Tensor:
    """[B] bool: the GEMM distance error allowance stays within :data:`TOLERANCE_EPS` eps nats of log-weight."""
    slack = gemm_slack(z_sq, max_row_sq, z_sq.dtype)
    return slack / (2.0 * sigma.square()) <= TOLERANCE_EPS * torch.finfo(z_sq.dtype).eps


# The two refinements below pick the same elements (ties aside) and give the same distances, but cannot be one
# function: the host path refines a variable number of (query, element) pairs found with nonzero() (few at
# large sigma, none when no query needs it), which reads their count back to the host; the fixed-shape path
# computes exact distances for every query's MAX_REFINED nearest and keeps them by mask, which never
# synchronises but costs MAX_REFINED gathered rows per query whatever sigma is.
def refine_sq_dists(z: torch.Tensor, z_sq: torch.Tensor, sigma: torch.Tensor, sq_dists: torch.Tensor,
                    row_ids: torch.Tensor, rows: ResidentRows | torch.Tensor, max_row_sq: float | torch.Tensor,
                    best_known: torch.Tensor | None = None, chunk_rows: int = 8192,
                    fixed_shapes: bool = False) -> torch.Tensor:
    """Replace GEMM distances by exact ones wherever the GEMM error could change a weight.

    A query needs refinement when its error allowance exceeds :data:`TOLERANCE_EPS` eps nats of
    log-weight (small sigma only; 0.012 nats in float32). Then its elements within
    :data:`WINDOW_NATS` (plus twice the allowance) of the best, at most :data:`MAX_REFINED` of them,
    are recomputed from direct differences. The others keep their GEMM value: either their weight is
    below e^-40 of the best, or the posterior spreads over more than MAX_REFINED elements, where the
    sub-tolerance weight errors of the rest average out.

    Args:
        z: queries [B, d]; z_sq: ||z||^2 [B]; sigma: [B].
        sq_dists: GEMM distances [B, m], modified in place and returned.
        row_ids: indices into ``rows`` of the m columns, [m] (shared by all queries) or [B, m].
        rows: the store's resident rows, or a tensor [M, d] of the rows themselves.
        max_row_sq: the largest ||x||^2 among ``rows`` (enters the error allowance).
        best_known: exact squared distances [B] of another candidate outside ``sq_dists`` (STF's own
            source); the window is measured from the better of it and the GEMM minimum.
        fixed_shapes: the host-synchronisation-free variant (:func:`refine_sq_dists_fixed`).
    """
    if fixed_shapes:
        return refine_sq_dists_fixed(z, z_sq, sigma, sq_dists, row_ids, rows, max_row_sq, best_known)
    slack = gemm_slack(z_sq, max_row_sq, z.dtype)
    two_var = 2.0 * sigma.square()
    needs = (~gemm_is_accurate(z_sq, sigma, max_row_sq)).nonzero().squeeze(1)
    if needs.numel() == 0:
        return sq_dists
    window = (two_var * WINDOW_NATS + 2.0 * slack)[needs]
    block = sq_dists[needs]
    best = block.min(dim=1).values
    if best_known is not None:
        best = torch.minimum(best, best_known[needs])
    inside = block <= (best + window).unsqueeze(1)
    if int(inside.sum(dim=1).max()) > MAX_REFINED:  # rare: keep each query's MAX_REFINED nearest
        cut = block.kthvalue(MAX_REFINED, dim=1, keepdim=True).values
        inside &= block <= cut
    local, column = inside.nonzero(as_tuple=True)
    query = needs[local]
    ids = row_ids[column] if row_ids.ndim == 1 else row_ids[query, column]
    for start in range(0, ids.numel(), chunk_rows):
        stop = start + chunk_rows
        if isinstance(rows, ResidentRows):
            delta = rows.gather_scratch(ids[start:stop])
        else:
            delta = rows.index_select(0, ids[start:stop])
        delta = delta.sub_(z.index_select(0, query[start:stop]))
        sq_dists[query[start:stop], column[start:stop]] = sq_norms(delta)
    return sq_dists


def refine_sq_dists_fixed(z: torch.Tensor, z_sq: torch.Tensor, sigma: torch.Tensor, sq_dists: torch.Tensor,
                          row_ids: torch.Tensor, rows: ResidentRows | torch.Tensor, max_row_sq: float | torch.Tensor,
                          best_known: torch.Tensor | None = None, query_step: int = 32) -> torch.Tensor:
    """:func:`refine_sq_dists` with fixed shapes and no branch on values (no host synchronisation).

    Every query's :data:`MAX_REFINED` nearest columns by GEMM distance get exact distances computed;
    they replace the GEMM ones where the query needs refinement and the column lies in the window.
    That is the same set of elements the default path refines (ties aside), computed for all queries.
    """
    slack = gemm_slack(z_sq, max_row_sq, z.dtype)
    needs = ~gemm_is_accurate(z_sq, sigma, max_row_sq)
    count = min(MAX_REFINED, sq_dists.shape[1])
    nearest, columns = sq_dists.topk(count, dim=1, largest=False, sorted=True)
    best = nearest[:, 0] if best_known is None else torch.minimum(nearest[:, 0], best_known)
    window = 2.0 * sigma.square() * WINDOW_NATS + 2.0 * slack
    refine = needs.unsqueeze(1) & (nearest <= (best + window).unsqueeze(1))
    ids = row_ids[columns] if row_ids.ndim == 1 else row_ids.gather(1, columns)
    exact = torch.empty_like(nearest)
    for start in range(0, z.shape[0], query_step):
        block = ids[start : start + query_step]
        if isinstance(rows, ResidentRows):
            gathered = rows.gather(block.reshape(-1), fixed_shapes=True)
        else:
            gathered = rows.index_select(0, block.reshape(-1))
        delta = gathered.view(*block.shape, -1).sub_(z[start : start + query_step].unsqueeze(1))
        exact[start : start + query_step] = sq_norms(delta)
    return sq_dists.scatter_(1, columns, torch.where(refine, exact, nearest))


def exact_log_likelihoods(z: torch.Tensor, sigma: torch.Tensor, rows: ResidentRows,
                          chunk_rows: int = 1 << 16, fixed_shapes: bool = False) -> torch.Tensor:
    """log p(z | x_i) = -||z - x_i||^2 / (2 sigma^2) (up to a constant per query) for every element i,
    [B, N], accurate at every sigma.

    One GEMM pass over the data (chunked over rows), then :func:`refine_sq_dists`.
    """
    batch, size = z.shape[0], rows.size
    z_sq = z.square().sum(1)
    sq_dists = torch.empty(batch, size, dtype=z.dtype, device=z.device)
    for start, chunk in rows.chunks(chunk_rows):
        stop = start + chunk.shape[0]
        sq_dists[:, start:stop] = gemm_sq_dists(z, chunk, z_sq, rows.sq_norms[start:stop])
    all_ids = torch.arange(size, device=z.device)
    refine_sq_dists(z, z_sq, sigma, sq_dists, all_ids, rows, rows.max_sq_norm, fixed_shapes=fixed_shapes)
    return log_likelihood(sq_dists, sigma)


def reference_sq_dists(z: torch.Tensor, sigma: torch.Tensor, reference: torch.Tensor,
                       best_known: torch.Tensor | None = None, fixed_shapes: bool = False) -> torch.Tensor:
    """||z_b - r_j||^2 [B, m] against a reference batch [m, d] shared by all queries.

    GEMM distances refined where rounding could matter (the STF and uniform estimators' products);
    ``best_known`` and ``fixed_shapes`` as in :func:`refine_sq_dists`.
    """
    z_sq, reference_sq = z.square().sum(1), reference.square().sum(1)
    sq_dists = gemm_sq_dists(z, reference, z_sq, reference_sq)
    ids = torch.arange(reference.shape[0], device=z.device)
    # The largest norm stays a device scalar: reading it back would synchronise.
    return refine_sq_dists(z, z_sq, sigma, sq_dists, ids, reference, reference_sq.max(), best_known,
                           fixed_shapes=fixed_shapes)


def reference_log_likelihoods(z: torch.Tensor, sigma: torch.Tensor, reference: torch.Tensor,
                              fixed_shapes: bool = False) -> torch.Tensor:
    """log p(z_b | r_j) [B, m] (up to a constant per query) from :func:`reference_sq_dists`."""
    return log_likelihood(reference_sq_dists(z, sigma, reference, fixed_shapes=fixed_shapes), sigma)
