"""The fast KNN estimator (knn_cm.estimators.knn) against Algorithm 1 as the paper writes it
(knn_cm.estimators.reference, float64): for the same draws the same proposal q (Eq. 13) and the same SNIS
estimate (Eq. 11), and draws distributed as q; on flat (faiss) and torch indexes, host and sync-free paths.

Together these pin the estimator's distribution to the paper's: its estimate is a fixed function of its draws,
that function is the reference's, and the draws have the reference's distribution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from knn_cm.data import DataStore
from knn_cm.estimators import make_estimator, reference
from knn_cm.estimators.distances import gemm_slack
from knn_cm.search import build_index

K, N_DRAWS = 32, 16
SIGMAS = [0.3, 1.0, 3.0, 10.0, 30.0]
F64 = torch.float64


@pytest.fixture(scope="module")
def store() -> DataStore:
    images = np.random.default_rng(0).integers(0, 256, (600, 3, 4, 4), dtype=np.uint8)
    return DataStore.from_array(images, name="reference")


@pytest.fixture(scope="module")
def data(store) -> torch.Tensor:
    return store.float(torch.arange(len(store)), dtype=F64).reshape(len(store), -1)


@pytest.fixture(scope="module")
def indexes(store) -> dict:
    return {kind: build_index(store, kind) for kind in ("flat", "torch")}


def _queries(store, sigma: float, count: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = store.float(torch.randperm(len(store), generator=generator)[:count], dtype=F64)
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=F64)


def _gemm_allowance(z: torch.Tensor, sigma: float, data: torch.Tensor) -> torch.Tensor:
    """[B] nats: how far a float32 log-likelihood may be off, the GEMM error allowance of
    knn_cm.estimators.distances over 2 sigma^2 (direct differences err less)."""
    return gemm_slack(z.square().sum(1), data.square().sum(1).max(), torch.float32) / (2 * sigma**2)


@pytest.mark.parametrize("refine_proposal", [False, True], ids=["index_distances", "refined_proposal"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["host", "sync_free"])
@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_same_draws_give_the_reference_proposal_and_estimate(store, data, indexes, kind, sync_free, refine_proposal):
    knn = make_estimator("knn", store, index=indexes[kind], k=K, n=N_DRAWS, sync_free=sync_free,
                         refine_proposal=refine_proposal)
    for sigma in SIGMAS:
        z64 = _queries(store, sigma)
        z = z64.float()
        drawn, log_q = knn.draws(z, sigma, torch.Generator().manual_seed(1))
        fast = knn.estimate_from_draws(z, sigma, drawn, log_q)
        # The estimator's own call makes exactly these draws and this estimate.
        assert torch.equal(knn(z, sigma, generator=torch.Generator().manual_seed(1)), fast)
        z_flat = z.reshape(len(z), -1).to(F64)  # the reference gets the float32 queries the estimator saw
        allowance = _gemm_allowance(z_flat, sigma, data)
        for b in range(len(z)):
            q = reference.proposal(z_flat[b], sigma, data, K)
            # Eq. 13 for every drawn element (neighbours and tail alike): log p and log Z_q each off by the
            # distances' float32 error at most.
            log_q_error = (log_q[b].to(F64) - q[drawn[b]].log()).abs().max()
            assert log_q_error <= 2 * allowance[b] + 1e-6, (sigma, b, float(log_q_error), float(allowance[b]))
            # Eq. 11 on the same draws: each log-weight is off by log q's error plus its likelihood's, so the
            # normalised weights by twice that, times the drawn rows' spread around the estimate.
            expected = reference.snis_mean(z_flat[b], sigma, data, drawn[b], q)
            spread = (data[drawn[b]] - expected).abs().max()
            tolerance = 2 * (3 * allowance[b] + 1e-6) * spread + 1e-5
            error = (fast[b].reshape(-1).to(F64) - expected).abs().max()
            assert error <= tolerance, (sigma, b, float(error), float(tolerance))


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_in_float64_with_a_refined_proposal_the_fast_path_is_the_reference(store, data, indexes, kind):
    """With exact proposal distances and float64 weights nothing is left but float64 rounding."""
    for sync_free in (False, True):
        knn = make_estimator("knn", store, index=indexes[kind], k=K, n=N_DRAWS, sync_free=sync_free,
                             refine_proposal=True, dtype=F64)
        for sigma in SIGMAS:
            z = _queries(store, sigma)
            drawn, log_q = knn.draws(z, sigma, torch.Generator().manual_seed(2))
            fast = knn.estimate_from_draws(z, sigma, drawn, log_q).reshape(len(z), -1)
            for b in range(len(z)):
                q = reference.proposal(z[b].reshape(-1), sigma, data, K)
                torch.testing.assert_close(log_q[b], q[drawn[b]].log(), rtol=1e-9, atol=1e-9)
                expected = reference.snis_mean(z[b].reshape(-1), sigma, data, drawn[b], q)
                torch.testing.assert_close(fast[b], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sync_free", [False, True], ids=["host", "sync_free"])
@pytest.mark.parametrize("kind", ["flat", "torch"])
@pytest.mark.parametrize("sigma", [3.0, 30.0])
def test_draws_follow_the_reference_proposal(store, data, indexes, kind, sync_free, sigma):
    """Many draws: each neighbour and the tail as a whole are drawn with their Eq. 13 probabilities, and the tail's
    draws spread uniformly over the N - k elements outside K (chi-square tests, seeded, at p > 1e-6)."""
    draws_per_query = 50_000
    knn = make_estimator("knn", store, index=indexes[kind], k=K, n=draws_per_query, sync_free=sync_free)
    z = _queries(store, sigma, count=2, seed=3).float()
    drawn, _ = knn.draws(z, sigma, torch.Generator().manual_seed(4))
    for b in range(len(z)):
        z_flat = z[b].reshape(-1).to(F64)
        q = reference.proposal(z_flat, sigma, data, K)
        neighbours = reference.nearest_neighbours(z_flat, data, K)
        outside = torch.ones(len(data), dtype=torch.bool)
        outside[neighbours] = False
        counts = torch.bincount(drawn[b], minlength=len(data)).to(F64)
        # Categories: the k neighbours, then the tail as one.
        observed = torch.cat([counts[neighbours], counts[outside].sum().reshape(1)])
        expected = draws_per_query * torch.cat([q[neighbours], q[outside].sum().reshape(1)])
        assert expected.min() > 5, "every category needs enough expected draws for the chi-square test"
        statistic = float(((observed - expected) ** 2 / expected).sum())
        assert chi2.sf(statistic, len(observed) - 1) > 1e-6, (b, statistic)
        tail = counts[outside]
        statistic = float(((tail - tail.mean()) ** 2 / tail.mean()).sum())
        assert chi2.sf(statistic, len(tail) - 1) > 1e-6, (b, statistic)


def test_the_reference_proposal_is_the_posterior_when_k_is_n(data):
    """Section 3.2: with k = N the proposal equals the posterior p(x | z) and Z_q = p(z)."""
    z = data[7] + 2.0 * torch.randn(data.shape[1], generator=torch.Generator().manual_seed(0), dtype=F64)
    p = reference.likelihoods(z, 2.0, data)
    torch.testing.assert_close(reference.proposal(z, 2.0, data, len(data)), p / p.sum(), rtol=1e-12, atol=0)
    q = reference.proposal(z, 2.0, data, K)
    assert abs(float(q.sum()) - 1) < 1e-12 and bool((q > 0).all())
    # Many draws from the reference itself: the SNIS estimate approaches the exact posterior mean (Eq. 8).
    estimate = reference.knn_posterior_mean(z, 2.0, data, K, 200_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate, reference.posterior_mean(z, 2.0, data), rtol=0, atol=2e-2)
