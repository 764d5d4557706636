"""Self-normalised importance sampling: weighted means of dataset rows (Eq. 11).

    mu_hat(z) = sum_j w_j x_j / sum_j w_j,    w_j = p(z | x_j) / q(x_j)          (Eq. 11)

over the elements x_j drawn from a proposal q (Eq. 13 for KNN, 1/N for the uniform proposal). Weights are
handled as logarithms and normalised with a max-shift (softmax), so sigma from 0.002 to 80 gives no
overflow, underflow to all-zero, NaN or inf. Three ways to form such a mean:

- :func:`snis_mean`: per query, its own drawn rows, with p(z | x_j) from accurate distances (KNN);
- :func:`weighted_mean`: per query, its own rows with weights known without a likelihood (posterior Monte
  Carlo: the draws' counts);
- :func:`weights_times_rows` with :func:`normalised_weights`: dense weights over every element (the exact
  posterior, Eq. 8).

The per-query means visit queries in groups and gather each group's rows into one buffer. How the groups are
formed is the shape policy (``fixed_shapes``): the host path groups queries by their number of entries and
picks GEMM or direct-difference distances per query (fast on a CPU, but reading counts back synchronises a
GPU); the fixed-shape path visits every query's full width in groups whose size depends only on the shapes,
with direct differences throughout. The arithmetic on a group is the same code for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from knn_cm.data.resident import ResidentRows
from knn_cm.estimators.distances import gemm_is_accurate, log_likelihood, sq_norms


def default_chunk_rows(device: torch.device) -> int:
    """Rows gathered per group of :func:`snis_mean` / :func:`weighted_mean`: cache-sized on CPU, large on GPU."""
    return 2048 if device.type == "cpu" else 1 << 16


def normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis with weights below tiny / eps set to zero.

    Such weights change no sum at the dtype's precision, and as denormal numbers they would slow the
    following matrix product several-fold on CPUs.
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


def snis_mean(z: torch.Tensor, sigma: torch.Tensor, rows: ResidentRows, indices: torch.Tensor,
              log_weights: torch.Tensor, fixed_shapes: bool = False, chunk_rows: int | None = None) -> torch.Tensor:
    """Eq. 11 per query over its own drawn rows: x_hat_b = sum_j w_bj x_j / sum_j w_bj, [B, d].

    log w_bj = log_weights[b, j] + log p(z_b | x_j): the caller gives -log q(x_j) (plus the log of its count
    where repeated draws were merged, ``knn_cm.estimators.draws.combine_duplicates``); the likelihood comes
    from accurate distances. On the host path, queries whose GEMM error allowance exceeds the tolerance of
    ``distances.refine_sq_dists`` (small sigma) use direct differences, z_b + sum_j wbar_bj (x_j - z_b); the
    others the GEMM expansion with batched products (two passes over the gathered rows instead of four; the
    gather is memory-bound, so this is most of the estimator's cost at large sigma). The fixed-shape path uses
    direct differences throughout (exact to the rounding of the distance; on a GPU the gather is the cost).

    Args:
        z: [B, d]; sigma: [B].
        indices: dataset indices [B, m], -1 for padding (each query needs at least one entry: the host path
            raises without one, the fixed-shape path gives NaN there, as it cannot check without a sync).
        log_weights: [B, m]; -inf (or index -1) marks padding.
        fixed_shapes: the host-synchronisation-free shape policy (the module docstring).
        chunk_rows: rows gathered per group (default :func:`default_chunk_rows`).
    """
    out = torch.empty_like(z)
    z_sq = z.square().sum(1)
    for queries, ids, group_log_weights, absent, gathered, exact in _groups(
            rows, indices, log_weights, fixed_shapes, chunk_rows,
            exact_distances=None if fixed_shapes else ~gemm_is_accurate(z_sq, sigma, rows.max_sq_norm)):
        if exact:
            delta = gathered.sub_(z[queries].unsqueeze(1))  # x_j - z_b
            sq_dists = sq_norms(delta).masked_fill_(absent, math.inf)
            weights = torch.softmax(group_log_weights + log_likelihood(sq_dists, sigma[queries]), dim=1)
            out[queries] = z[queries] + torch.bmm(weights.unsqueeze(1), delta).squeeze(1)
        else:
            # [G, 1, d] x [G, d, W]: a CPU runs it several times faster than the [G, W, d] x [G, d, 1] GEMV.
            dots = torch.bmm(z[queries].unsqueeze(1), gathered.transpose(1, 2)).squeeze(1)
            sq_dists = (rows.sq_norms[ids] - 2.0 * dots + z_sq[queries].unsqueeze(1)).clamp_(min=0.0)
            sq_dists = sq_dists.masked_fill_(absent, math.inf)
            weights = torch.softmax(group_log_weights + log_likelihood(sq_dists, sigma[queries]), dim=1)
            out[queries] = torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)
    return out


def weighted_mean(rows: ResidentRows, indices: torch.Tensor, log_weights: torch.Tensor, fixed_shapes: bool = False,
                  chunk_rows: int | None = None) -> torch.Tensor:
    """sum_j softmax_j(log_weights[b]) x_j per query, [B, d]: weights known without a likelihood.

    The posterior Monte Carlo mean (Eq. 9): the draws come from p(x | z) itself, so their weights are their
    counts. ``indices``, ``log_weights``, ``fixed_shapes`` and ``chunk_rows`` as in :func:`snis_mean`.
    """
    out = torch.empty(indices.shape[0], rows.dim, dtype=rows.dtype, device=indices.device)
    for queries, _, group_log_weights, _, gathered, _ in _groups(rows, indices, log_weights, fixed_shapes,
                                                                   chunk_rows, exact_distances=None):
        weights = torch.softmax(group_log_weights, dim=1)
        out[queries] = torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)
    return out


class _Group(NamedTuple):
    """One group of queries with their entries: what the means above compute on."""

    queries: slice | torch.Tensor  # which queries (rows of z, indices, the output)
    ids: torch.Tensor  # dataset indices [G, W], padding clamped to 0
    log_weights: torch.Tensor  # [G, W], -inf at padding
    absent: torch.Tensor  # [G, W] bool: padding
    gathered: torch.Tensor  # rows x_j [G, W, d] (a scratch buffer on the host path)
    exact: bool  # distances from direct differences (else the GEMM expansion)


def _groups(rows: ResidentRows, indices: torch.Tensor, log_weights: torch.Tensor, fixed_shapes: bool,
            chunk_rows: int | None, exact_distances: torch.Tensor | None) -> Iterator[_Group]:
    """The shape policy: the groups of queries a weighted mean visits, rows gathered.

    Args:
        exact_distances: [B] bool, which queries need direct-difference distances on the host path (None:
            none do there; the fixed-shape path always uses them).
    """
    chunk_rows = chunk_rows or default_chunk_rows(indices.device)
    if fixed_shapes:
        # Every query visits all m entries (padding keeps weight 0 through -inf), in query groups whose size
        # depends only on m: no count is read back.
        width = indices.shape[1]
        valid = (indices >= 0) & (log_weights > -math.inf)
        safe_ids = indices.clamp(min=0)
        log_weights = log_weights.masked_fill(~valid, -math.inf)
        step = max(1, chunk_rows // max(1, width))
        for start in range(0, indices.shape[0], step):
            queries = slice(start, min(start + step, indices.shape[0]))
            gathered = rows.gather(safe_ids[queries].reshape(-1), fixed_shapes=True)
            yield _Group(queries, safe_ids[queries], log_weights[queries], ~valid[queries],
                         gathered.view(-1, width, rows.dim), True)
        return
    valid = (indices >= 0) & (log_weights > -math.inf)
    # Move each query's valid entries to the front, then visit queries by decreasing entry count, so a group's
    # width is its first query's count and padding costs little.
    front = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    indices = indices.gather(1, front)
    log_weights = log_weights.gather(1, front)
    counts = valid.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("snis_mean / weighted_mean: a query has no entry with finite weight")
    if exact_distances is None:
        exact_distances = torch.zeros_like(counts, dtype=torch.bool)
    counts_host = counts.tolist()
    for exact in (False, True):
        selected = (exact_distances == exact).nonzero().squeeze(1)
        order = selected[torch.argsort(counts[selected], descending=True)].tolist()
        start = 0
        while start < len(order):
            width = counts_host[order[start]]
            group = max(1, chunk_rows // width)
            queries = torch.tensor(order[start : start + group], device=indices.device)
            start += group
            ids = indices[queries, :width]
            absent = ids < 0
            safe_ids = ids.clamp(min=0)
            gathered = rows.gather_scratch(safe_ids.reshape(-1)).view(len(queries), width, -1)
            yield _Group(queries, safe_ids, log_weights[queries, :width].masked_fill(absent, -math.inf), absent,
                         gathered, exact)
