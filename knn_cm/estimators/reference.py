"""Algorithm 1 as the paper writes it, in float64, for one query at a time: the reference the fast path
(``knn_cm.estimators.knn``) is tested against (tests/unit/estimators/test_reference.py).

No index, no GEMM distances, no refinement, no duplicate merging, no fixed shapes: squared distances to every
element by direct differences, the k nearest by sorting them, the proposal as a dense vector over all N
elements, draws by ``torch.multinomial``. The only liberty: likelihoods are formed relative to the nearest
element, exp(-(d_i^2 - d_min^2) / (2 t^2)), a constant factor per query that cancels in Eq. 13 and in Eq. 11,
so that small t does not underflow every likelihood to 0.
"""

from __future__ import annotations

import torch


def likelihoods(z: torch.Tensor, t: float, data: torch.Tensor) -> torch.Tensor:
    """p_t(z | x_i) = exp(-||z - x_i||^2 / (2 t^2)) for every element, up to a constant: [N].

    z: one query [d]; data: the dataset D [N, d].
    """
    sq_dists = (data - z).square().sum(dim=1)
    return torch.exp(-(sq_dists - sq_dists.min()) / (2 * t**2))


def nearest_neighbours(z: torch.Tensor, data: torch.Tensor, k: int) -> torch.Tensor:
    """K: the indices of the k elements nearest to z, nearest first (the k most probable, Section 3.2): [k]."""
    return (data - z).square().sum(dim=1).argsort()[:k]


def proposal(z: torch.Tensor, t: float, data: torch.Tensor, k: int) -> torch.Tensor:
    """q_t(x_i | z) for every element (Eq. 13): [N], summing to 1.

    q = p_t(z | x_i) / Z_q for x_i in K, p_t(z | x_k) / Z_q outside, Z_q = sum_{K} p_t(z | x_i) + (N - k) p_t(z | x_k).
    """
    size = data.shape[0]
    k = min(k, size)
    p = likelihoods(z, t, data)
    neighbours = nearest_neighbours(z, data, k)
    p_k = p[neighbours[-1]]  # the k-th neighbour's likelihood bounds every element outside K
    z_q = p[neighbours].sum() + (size - k) * p_k
    q = torch.full_like(p, p_k)
    q[neighbours] = p[neighbours]
    return q / z_q


def snis_mean(z: torch.Tensor, t: float, data: torch.Tensor, drawn: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """mu_hat_KNN = sum_i wbar_i x_i, wbar_i = w_i / sum_j w_j, w_i = p_t(z | x_i) / q(x_i) (Eq. 11): [d].

    drawn: the n drawn elements' indices [n] (repeats count once per draw); q: the proposal [N].
    """
    w = likelihoods(z, t, data)[drawn] / q[drawn]
    w_bar = w / w.sum()
    return (w_bar.unsqueeze(1) * data[drawn]).sum(dim=0)


def knn_posterior_mean(z: torch.Tensor, t: float, data: torch.Tensor, k: int, n: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1 for one query z [d] at noise level t over data [N, d] (float64): mu_hat_KNN [d].

    The score estimate is (mu_hat_KNN - z) / t^2 (Eq. 5).
    """
    q = proposal(z, t, data, k)
    drawn = torch.multinomial(q, n, replacement=True, generator=generator)
    return snis_mean(z, t, data, drawn, q)


def posterior_mean(z: torch.Tensor, t: float, data: torch.Tensor) -> torch.Tensor:
    """The exact posterior mean E[x | z, t] = sum_i p_t(x_i | z) x_i (Eq. 8): [d]."""
    p = likelihoods(z, t, data)
    return (p / p.sum()) @ data
