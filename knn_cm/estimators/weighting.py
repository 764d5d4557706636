"""Shared numerics of the data-based estimators: distances, log-space weights, weighted means.

Two ways to get squared distances ||z - x||^2:
- GEMM expansion ||z||^2 - 2 z.x + ||x||^2: fast (matrix products) but in float32 its absolute error
  reaches several eps * (||z||^2 + ||x||^2), up to 1.7e-3 on CIFAR-10: about 200 nats at sigma = 0.002.
  :func:`refine_sq_dists` recomputes exactly the few elements whose weight that error could change.
- direct differences on gathered rows: exact to rounding of the distance itself; used wherever the
  GEMM error could change a weight by more than :data:`TOLERANCE_EPS` eps nats (small sigma), both for
  refinement and for the elements an estimator draws (:func:`weighted_row_mean`).
All weights are handled as logarithms and normalised with a max-shift (softmax), so sigma from 0.002
to 80 gives no overflow, underflow to all-zero, NaN or inf.
"""

from __future__ import annotations

import math

import torch

from knn_cm.data.resident import ResidentRows
from knn_cm.estimators.base import log_likelihood

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


def sq_norms(delta: torch.Tensor) -> torch.Tensor:
    """||delta||^2 over the last axis. vector_norm then square: 5x faster than vecdot on CPU (measured
    on [8, 256, 3072]) for a relative error of about 2 eps."""
    return torch.linalg.vector_norm(delta, dim=-1).square()


def default_chunk_rows(device: torch.device) -> int:
    """Rows gathered per step of :func:`weighted_row_mean`: cache-sized on CPU, large on GPU."""
    return 2048 if device.type == "cpu" else 1 << 16


def gemm_sq_dists(z: torch.Tensor, rows: torch.Tensor, z_sq: torch.Tensor, rows_sq: torch.Tensor) -> torch.Tensor:
    """||z_b - x_j||^2 [B, m] by the GEMM expansion; z [B, d], rows [m, d], z_sq [B], rows_sq [m]."""
    sq = torch.addmm(rows_sq.unsqueeze(0), z, rows.T, alpha=-2.0)
    return sq.add_(z_sq.unsqueeze(1)).clamp_(min=0.0)


def gemm_slack(z_sq: torch.Tensor, max_row_sq: float, dtype: torch.dtype) -> torch.Tensor:
    """Allowance [B] for the absolute error of :func:`gemm_sq_dists` in ``dtype``."""
    return GEMM_ERROR_FACTOR * torch.finfo(dtype).eps * (z_sq + max_row_sq)


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
    needs = (~_gemm_is_accurate(z_sq, sigma, max_row_sq)).nonzero().squeeze(1)
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
    needs = ~_gemm_is_accurate(z_sq, sigma, max_row_sq)
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
    """-||z - x_i||^2 / (2 sigma^2) for every element i, [B, N], accurate at every sigma.

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
    """-||z_b - r_j||^2 / (2 sigma_b^2) [B, m] (up to a constant per query) from :func:`reference_sq_dists`."""
    return log_likelihood(reference_sq_dists(z, sigma, reference, fixed_shapes=fixed_shapes), sigma)


def normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis with weights below tiny / eps set to zero.

    Such weights change no sum at the dtype's precision, and as denormal numbers they would slow the
    following matrix product several-fold on CPUs (measured 1.8x on the exact estimator at t >= 5).
    """
    weights = torch.softmax(log_weights, dim=-1)
    info = torch.finfo(weights.dtype)
    return weights.masked_fill_(weights < info.tiny / info.eps, 0.0)


def weights_times_rows(weights: torch.Tensor, rows: ResidentRows, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """sum_i weights[b, i] x_i, [B, d], for dense weights [B, N] over every element (chunked GEMM)."""
    out = torch.zeros(weights.shape[0], rows.dim, dtype=weights.dtype, device=weights.device)
    for start, chunk in rows.chunks(chunk_rows):
        out.addmm_(weights[:, start : start + chunk.shape[0]], chunk)
    return out


def sample_categorical(logits: torch.Tensor, num_draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """Draws [B, n] from the categorical distributions softmax(logits) [B, m], by inverse CDF.

    Entries with logit -inf are never drawn. Probabilities are accumulated in float64.
    """
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    cdf = probs.cumsum(dim=1)
    uniform = torch.rand(logits.shape[0], num_draws, generator=generator, dtype=torch.float64,
                         device=logits.device) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, uniform, right=True)
    return draws.clamp_(max=logits.shape[1] - 1)


def combine_duplicates(indices: torch.Tensor, log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge repeated indices per row; each kept entry's weight is multiplied by its count.

    Repeats of one index must carry equal weights (true for every estimator here: a weight depends
    only on the element). indices [B, n] int64 (>= 0), log_weights [B, n] -> (indices [B, n] with -1
    padding, log_weights [B, n] with -inf padding); unique entries come first in each row.
    """
    sorted_indices, order = indices.sort(dim=1)
    sorted_log_weights = log_weights.gather(1, order)
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[:, 1:] = sorted_indices[:, 1:] != sorted_indices[:, :-1]
    run = first.cumsum(dim=1) - 1
    counts = torch.zeros_like(sorted_log_weights).scatter_add_(1, run, torch.ones_like(sorted_log_weights))
    unique = torch.full_like(sorted_indices, -1).scatter_(1, run, sorted_indices)
    unique_log_weights = torch.full_like(sorted_log_weights, -math.inf).scatter_(1, run, sorted_log_weights)
    return unique, unique_log_weights + counts.log()


def weighted_row_mean(z: torch.Tensor, sigma: torch.Tensor, rows: ResidentRows, indices: torch.Tensor,
                      log_weights: torch.Tensor, use_likelihood: bool = True,
                      chunk_rows: int | None = None, fixed_shapes: bool = False) -> torch.Tensor:
    """Self-normalised weighted mean of gathered rows per query (Eq. 11), with accurate distances.

    For each query b: x_hat_b = sum_j w_bj x_j / sum_j w_bj over its entries j with
    log w_bj = log_weights[b, j] (- ||z_b - x_j||^2 / (2 sigma_b^2) when ``use_likelihood``).
    Rows are gathered into a reused buffer; queries are processed in groups of similar entry counts
    so padding costs little. Distances come from direct differences (z_b + sum_j wbar_bj (x_j - z_b))
    for queries whose GEMM error allowance exceeds the tolerance of :func:`refine_sq_dists` (small
    sigma), and from the GEMM expansion with batched products otherwise (two passes over the gathered
    rows instead of four; the gather is memory-bound, so this is most of the estimator's cost at large
    sigma).

    Args:
        z: [B, d]; sigma: [B].
        indices: dataset indices [B, m], -1 for padding (each query needs at least one entry).
        log_weights: [B, m]; -inf (or index -1) marks padding.
        chunk_rows: rows gathered per step (default :func:`default_chunk_rows`).
        fixed_shapes: the host-synchronisation-free variant (:func:`weighted_row_mean_fixed`).

    Returns:
        x_hat [B, d].
    """
    chunk_rows = chunk_rows or default_chunk_rows(z.device)
    if fixed_shapes:
        return weighted_row_mean_fixed(z, sigma, rows, indices, log_weights, use_likelihood, chunk_rows)
    valid = (indices >= 0) & (log_weights > -math.inf)
    # Move each query's valid entries to the front, then visit queries by decreasing entry count.
    front = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    indices = indices.gather(1, front)
    log_weights = log_weights.gather(1, front)
    counts = valid.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("weighted_row_mean: a query has no entry with finite weight")
    z_sq = z.square().sum(1)
    if use_likelihood:
        use_gemm = _gemm_is_accurate(z_sq, sigma, rows.max_sq_norm)
    else:  # no distances needed
        use_gemm = torch.ones_like(counts, dtype=torch.bool)
    counts_host = counts.tolist()
    out = torch.empty_like(z)
    for gemm in (True, False):
        selected = (use_gemm == gemm).nonzero().squeeze(1)
        order = selected[torch.argsort(counts[selected], descending=True)].tolist()
        start = 0
        while start < len(order):
            width = counts_host[order[start]]
            group = max(1, chunk_rows // width)
            queries = torch.tensor(order[start : start + group], device=z.device)
            start += group
            ids = indices[queries, :width]
            group_log_weights = log_weights[queries, :width].masked_fill(ids < 0, -math.inf)
            safe_ids = ids.clamp(min=0)
            gathered = rows.gather_scratch(safe_ids.reshape(-1)).view(len(queries), width, -1)
            z_group = z[queries]
            if gemm:
                if use_likelihood:
                    # [G, 1, d] x [G, d, W]: 4x faster on CPU than the [G, W, d] x [G, d, 1] GEMV.
                    dots = torch.bmm(z_group.unsqueeze(1), gathered.transpose(1, 2)).squeeze(1)
                    sq_dists = (rows.sq_norms[safe_ids] - 2.0 * dots + z_sq[queries].unsqueeze(1)).clamp_(min=0.0)
                    sq_dists = sq_dists.masked_fill_(ids < 0, math.inf)
                    group_log_weights = group_log_weights + log_likelihood(sq_dists, sigma[queries])
                weights = torch.softmax(group_log_weights, dim=1)
                out[queries] = torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)
            else:  # small sigma (use_likelihood is set): exact distances
                delta = gathered.sub_(z_group.unsqueeze(1))  # x_j - z_b
                sq_dists = sq_norms(delta).masked_fill_(ids < 0, math.inf)
                group_log_weights = group_log_weights + log_likelihood(sq_dists, sigma[queries])
                weights = torch.softmax(group_log_weights, dim=1)
                out[queries] = z_group + torch.bmm(weights.unsqueeze(1), delta).squeeze(1)
    return out


def weighted_row_mean_fixed(z: torch.Tensor, sigma: torch.Tensor, rows: ResidentRows, indices: torch.Tensor,
                            log_weights: torch.Tensor, use_likelihood: bool = True,
                            chunk_rows: int | None = None) -> torch.Tensor:
    """:func:`weighted_row_mean` with fixed shapes: no host synchronisation, for CUDA.

    Every query visits all m entries (padding keeps weight 0 through -inf), in query groups whose size
    depends only on m, and distances always come from direct differences (exact to the rounding of the
    distance itself; on a GPU the gather, not the arithmetic, is the cost). A query without any valid
    entry gives NaN here, where the default path raises: callers guarantee one (KNN draws n >= 1).
    """
    chunk_rows = chunk_rows or default_chunk_rows(z.device)
    width = indices.shape[1]
    valid = (indices >= 0) & (log_weights > -math.inf)
    safe_ids = indices.clamp(min=0)
    log_weights = log_weights.masked_fill(~valid, -math.inf)
    out = torch.empty_like(z)
    step = max(1, chunk_rows // max(1, width))
    for start in range(0, z.shape[0], step):
        stop = min(start + step, z.shape[0])
        gathered = rows.gather(safe_ids[start:stop].reshape(-1), fixed_shapes=True).view(stop - start, width, -1)
        group_log_weights = log_weights[start:stop]
        if use_likelihood:
            delta = gathered.sub_(z[start:stop].unsqueeze(1))  # x_j - z_b
            sq_dists = sq_norms(delta).masked_fill_(~valid[start:stop], math.inf)
            weights = torch.softmax(group_log_weights + log_likelihood(sq_dists, sigma[start:stop]), dim=1)
            out[start:stop] = z[start:stop] + torch.bmm(weights.unsqueeze(1), delta).squeeze(1)
        else:
            weights = torch.softmax(group_log_weights, dim=1)
            out[start:stop] = torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)
    return out


def _gemm_is_accurate(z_sq: torch.Tensor, sigma: torch.Tensor, max_row_sq: float) -> torch.Tensor:
    """[B] bool: the GEMM distance error allowance stays within :data:`TOLERANCE_EPS` eps nats of log-weight."""
    slack = gemm_slack(z_sq, max_row_sq, z_sq.dtype)
    return slack / (2.0 * sigma.square()) <= TOLERANCE_EPS * torch.finfo(z_sq.dtype).eps
