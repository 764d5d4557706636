"""Random draws of dataset elements: from categorical proposals, uniformly, and merging repeated draws.

Every draw here has fixed shapes and no branch on values, so one function serves the host and the
host-synchronisation-free (CUDA) path alike.
"""

from __future__ import annotations

import math

import torch

from knn_cm.search.sorting import sorted_rows


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


def uniform_outside(excluded: torch.Tensor, outside_count: torch.Tensor, num_draws: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Draw [B, n] indices uniformly from {0..N-1} minus each row's ``excluded`` indices, exactly.

    Args:
        excluded: distinct indices [B, k] per row (-1 for none, e.g. neighbours an approximate index missed).
        outside_count: N minus the number of excluded indices of each row, [B].

    With the excluded indices sorted s_0 < s_1 < ..., t_i = s_i - i counts the others below s_i; the u-th
    other index (u in [0, N - k)) is u + #{i : t_i <= u}.
    """
    positions = torch.arange(excluded.shape[1], device=excluded.device)
    missing = excluded < 0
    sorted_excluded = sorted_rows(excluded.masked_fill(missing, torch.iinfo(torch.int64).max))
    below = torch.where(sorted_excluded == torch.iinfo(torch.int64).max,
                        torch.iinfo(torch.int64).max, sorted_excluded - positions)
    uniform = torch.rand(excluded.shape[0], num_draws, generator=generator, dtype=torch.float64,
                         device=excluded.device)
    rank = (uniform * outside_count.unsqueeze(1)).floor().to(torch.int64)
    rank = torch.minimum(rank, (outside_count - 1).clamp(min=0).unsqueeze(1))
    return rank + torch.searchsorted(below, rank, right=True)


def draw_uniform_rows(rows, count: int, generator: torch.Generator | None, fixed_shapes: bool = False) -> torch.Tensor:
    """``count`` elements drawn uniformly with replacement: rows [count, d] (``fixed_shapes``: see
    :meth:`~knn_cm.data.resident.ResidentRows.gather`)."""
    ids = torch.randint(0, rows.size, (count,), generator=generator, device=rows.device)
    return rows.gather(ids, fixed_shapes=fixed_shapes)


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
