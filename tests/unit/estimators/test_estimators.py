"""Estimators against brute-force oracles, the paper's theorems, numerics and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.diffusion import VEProcess, VPProcess
from knn_cm.estimators import estimator_names, make_estimator
from knn_cm.estimators.distances import gemm_is_accurate
from knn_cm.estimators.draws import combine_duplicates
from knn_cm.estimators.snis import snis_mean
from knn_cm.search import build_index

SIGMAS = [0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0]
F64 = torch.float64


def naive_posterior(data: torch.Tensor, z: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute force: posterior probabilities [B, N] by direct differences, and the mean [B, d]."""
    sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
    sq_dists = (z[:, None, :] - data[None]).square().sum(-1)
    probs = torch.softmax(-sq_dists / (2 * sigma**2), dim=1)
    return probs, probs @ data


@pytest.fixture(scope="module")
def data64(random_store) -> torch.Tensor:
    return random_store.float(dtype=torch.float64).reshape(len(random_store), -1)


@pytest.fixture(scope="module")
def flat_index(random_store):
    return build_index(random_store, "flat")


def noisy_batch(store, sigma: float, count: int = 16, seed: int = 0):
    """Sources x [count, C, H, W] (float64) and z = x + sigma * eps."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(len(store), generator=generator)[:count]
    x = store.float(ids, dtype=F64)
    return x, x + sigma * torch.randn(x.shape, generator=generator, dtype=F64)


# ------------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("sigma", SIGMAS)
def test_exact_float64_matches_naive_reference(random_store, data64, sigma):
    x, z = noisy_batch(random_store, sigma)
    z[0] = x[0]  # one query exactly on a data point
    estimate = make_estimator("exact", random_store, dtype=F64)(z, sigma).reshape(len(z), -1)
    _, reference = naive_posterior(data64, z.reshape(len(z), -1), sigma)
    relative = (estimate - reference).norm(dim=1) / reference.norm(dim=1)
    assert relative.max().item() <= 1e-10


def test_exact_float32_is_accurate_at_small_sigma_on_large_norms():
    """GEMM distances alone would be off by tens of nats here (||x||^2 ~ 3,000): refinement fixes it."""
    generator = np.random.default_rng(3)
    base = generator.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    images = np.repeat(base, 64, axis=0)
    flips = generator.integers(0, 3072, 64)
    images.reshape(64, -1)[np.arange(64), flips] ^= 1  # near-duplicates one grey level apart
    store = DataStore.from_array(images)
    z = store.float([5]) + 0.002 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = store.float().reshape(64, -1).double()
    for sigma in (0.002, 0.005, 0.02):
        _, reference = naive_posterior(data, z.reshape(1, -1).double(), sigma)
        estimate = make_estimator("exact", store)(z, sigma).reshape(1, -1).double()
        assert (estimate - reference).abs().max().item() < 1e-5, sigma


# --------------------------------------------------------------------------------------------- knn
@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.5, 5.0, 80.0])
def test_knn_proposal_equals_posterior_when_k_is_n(random_store, data64, flat_index, sigma):
    x, z = noisy_batch(random_store, sigma, count=8)
    knn = make_estimator("knn", random_store, index=flat_index, k=len(random_store), n=16,
                         refine_proposal=True, dtype=F64)
    proposal = knn.proposal(z, sigma)
    dense = torch.zeros(len(z), len(random_store), dtype=F64)
    dense.scatter_(1, proposal.indices, proposal.log_q_neighbours.exp())
    posterior, _ = naive_posterior(data64, z.reshape(len(z), -1), sigma)
    assert (dense - posterior).abs().max().item() <= 1e-12
    assert bool(torch.isneginf(proposal.log_q_tail).all()) and bool((proposal.tail_size == 0).all())


def test_knn_proposal_is_eq13(random_store, data64, flat_index):
    """For k < N: neighbours at p(z|x_i)/Z_q, every other element at p(z|x_k)/Z_q, summing to one."""
    x, z = noisy_batch(random_store, 1.5, count=4)
    k = 50
    proposal = make_estimator("knn", random_store, index=flat_index, k=k, refine_proposal=True,
                              dtype=F64).proposal(z, 1.5)
    sq = (z.reshape(4, 1, -1) - data64[None]).square().sum(-1)
    likelihood = torch.exp(-(sq - sq.min(1, keepdim=True).values) / (2 * 1.5**2))
    neighbour_lik = likelihood.gather(1, proposal.indices)
    z_q = neighbour_lik.sum(1) + (len(random_store) - k) * neighbour_lik[:, -1]
    assert torch.allclose(proposal.log_q_neighbours.exp(), neighbour_lik / z_q[:, None], rtol=1e-10, atol=0)
    assert torch.allclose(proposal.log_q_tail.exp(), neighbour_lik[:, -1] / z_q, rtol=1e-10, atol=0)
    total = proposal.log_q_neighbours.exp().sum(1) + proposal.tail_size * proposal.log_q_tail.exp()
    assert torch.allclose(total, torch.ones(4, dtype=F64), atol=1e-12)


def _mse_over_repeats(estimator, z, x, sigma, reference, repeats, seed=0):
    generator = torch.Generator().manual_seed(seed)
    errors = [(estimator(z, sigma, x=x, generator=generator) - reference).square().mean().item()
              for _ in range(repeats)]
    return float(np.mean(errors))


def test_knn_error_falls_with_n_and_is_below_stf(random_store, flat_index):
    sigma = 1.5  # intermediate: the posterior spreads over ~30 elements
    x, z = noisy_batch(random_store, sigma, count=32)
    reference = make_estimator("exact", random_store, dtype=F64)(z, sigma)
    knn_mse = [_mse_over_repeats(make_estimator("knn", random_store, index=flat_index, k=256, n=n, dtype=F64),
                                 z, x, sigma, reference, repeats=8) for n in (4, 16, 64, 256)]
    assert all(later < 0.6 * earlier for earlier, later in zip(knn_mse, knn_mse[1:])), knn_mse
    stf_mse = _mse_over_repeats(make_estimator("stf", random_store, n=256, dtype=F64), z, x, sigma, reference, 8)
    assert knn_mse[-1] < 0.3 * stf_mse, (knn_mse[-1], stf_mse)


def test_knn_on_approximate_index_stays_close(clustered_store):
    sigma = 0.3
    x, z = noisy_batch(clustered_store, sigma, count=32)
    reference = make_estimator("exact", clustered_store)(z.float(), sigma)
    flat = build_index(clustered_store, "flat")
    ivf = build_index(clustered_store, "ivf", nlist=40, nprobe=4, cache=False)
    errors = {name: _mse_over_repeats(make_estimator("knn", clustered_store, index=index, k=256, n=64),
                                      z.float(), x.float(), sigma, reference, repeats=4)
              for name, index in (("flat", flat), ("ivf", ivf))}
    uniform = _mse_over_repeats(make_estimator("uniform", clustered_store, n=64), z.float(), x.float(), sigma,
                                reference, repeats=4)
    assert errors["ivf"] < 3 * errors["flat"] + 1e-6 and errors["ivf"] < 0.1 * uniform, (errors, uniform)


def test_theorem_4_1_knn_covariance_bound(random_store, data64, flat_index):
    """Tr Cov(mu_KNN) <= Z_q / p_t(z) * Tr Cov(mu_MC) (Eq. 14), within Monte-Carlo error.

    p_t(z) is taken with the normalisation of Z_q (sum of p(z | x_i) over the dataset, no 1/N) so the
    ratio is >= 1 and equals 1 when k = N, as the proof uses it.
    """
    sigma, n, k, repeats = 1.5, 32, 16, 400
    x, z = noisy_batch(random_store, sigma, count=6, seed=1)
    z_flat = z.reshape(len(z), -1)
    posterior, mu = naive_posterior(data64, z_flat, sigma)
    tr_cov_mc = (posterior * (data64[None] - mu[:, None]).square().sum(-1)).sum(1) / n  # analytic, [B]
    sq = (z_flat[:, None] - data64[None]).square().sum(-1)
    likelihood = torch.exp(-(sq - sq.min(1, keepdim=True).values) / (2 * sigma**2))
    kth = likelihood.sort(dim=1, descending=True).values[:, :k]
    ratio = (kth.sum(1) + (len(random_store) - k) * kth[:, -1]) / likelihood.sum(1)
    knn = make_estimator("knn", random_store, index=flat_index, k=k, n=n, dtype=F64)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([knn(z, sigma, generator=generator).reshape(len(z), -1) for _ in range(repeats)])
    tr_cov_knn = draws.var(dim=0).sum(1)
    # Sampling error of a variance estimate from R draws: relative s.e. ~ sqrt(2 / (R - 1)) per dimension;
    # the trace averages 48 dimensions, so 4 s.e. of one dimension is a generous allowance.
    allowance = 1 + 4 * math.sqrt(2 / (repeats - 1))
    assert bool((ratio > 1.05).any()), "the test needs queries where the bound is not trivially Z_q = p_t(z)"
    assert bool((tr_cov_knn <= ratio * tr_cov_mc * allowance).all()), (tr_cov_knn, ratio * tr_cov_mc)
    uniform = make_estimator("uniform", random_store, n=n, dtype=F64)
    tr_cov_uniform = torch.stack([uniform(z, sigma, generator=generator).reshape(len(z), -1)
                                  for _ in range(repeats)]).var(dim=0).sum(1)
    assert bool((tr_cov_knn < tr_cov_uniform).all())


# ---------------------------------------------------------------------------------- unbiasedness
def test_single_sample_is_unbiased(random_store):
    """E[x - E[x | z]] = 0 over joint draws (x, z): the single-sample estimator targets the posterior mean."""
    sigma, count = 1.5, 1500
    x, z = noisy_batch(random_store, sigma, count=count, seed=2)
    single = make_estimator("single", random_store, dtype=F64)(z, sigma, x=x)
    exact = make_estimator("exact", random_store, dtype=F64)(z, sigma)
    residual = (single - exact).reshape(count, -1)
    standard_error = residual.std(dim=0) / math.sqrt(count)
    z_scores = residual.mean(dim=0) / standard_error
    assert z_scores.abs().mean().item() < 1.2 and z_scores.abs().max().item() < 4.5
    # Not trivially passing: a variant biased by 0.1 per pixel is detected.
    biased = residual + 0.1
    assert (biased.mean(dim=0) / (biased.std(dim=0) / math.sqrt(count))).abs().mean().item() > 4


def test_mc_is_unbiased(random_store, data64):
    sigma, repeats = 1.5, 300
    x, z = noisy_batch(random_store, sigma, count=4)
    _, mu = naive_posterior(data64, z.reshape(4, -1), sigma)
    mc = make_estimator("mc", random_store, n=8, dtype=F64)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([mc(z, sigma, generator=generator).reshape(4, -1) for _ in range(repeats)])
    z_scores = (draws.mean(0) - mu) / (draws.std(0) / math.sqrt(repeats) + 1e-300)
    assert z_scores.abs().mean().item() < 1.2 and z_scores.abs().max().item() < 5


# ------------------------------------------------------------------------------------------- VP
def test_vp_general_estimator_matches_exact_vp_posterior(random_store, data64, flat_index):
    """Algorithm 2: query z / s(t), noise sigma(t) gives the VP posterior mean E[x | z, t]."""
    process = VPProcess()
    t = 0.35
    sigma_t, scale_t = process.sigma(torch.tensor(t, dtype=F64)), process.scale(torch.tensor(t, dtype=F64))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randperm(len(random_store), generator=generator)[:8]
    x = random_store.float(ids, dtype=F64)
    z = process.add_noise(x, t, torch.randn(x.shape, generator=generator, dtype=F64))
    # Brute force with the VP likelihood N(z; s x_i, s^2 sigma^2 I) (Eq. 46), no rescaling tricks.
    z_flat = z.reshape(8, -1)
    log_lik = -(z_flat[:, None] - scale_t * data64[None]).square().sum(-1) / (2 * scale_t**2 * sigma_t**2)
    posterior = torch.softmax(log_lik, dim=1)
    reference = posterior @ data64
    exact = process.posterior_mean(make_estimator("exact", random_store, dtype=F64), z, t).reshape(8, -1)
    assert ((exact - reference).norm(dim=1) / reference.norm(dim=1)).max().item() < 1e-10
    # With k = N the KNN estimator is posterior Monte Carlo: its MSE is the posterior variance / n.
    n = 4096
    knn = make_estimator("knn", random_store, index=flat_index, k=2000, n=n, dtype=F64)
    knn_error = (process.posterior_mean(knn, z, t, generator=generator).reshape(8, -1) - reference).square().mean()
    mc_variance = (posterior * (data64[None] - reference[:, None]).square().mean(-1)).sum(1).mean() / n
    assert knn_error < 3 * mc_variance
    unscaled_error = (knn(z, sigma_t, generator=generator).reshape(8, -1) - reference).square().mean()
    assert unscaled_error > 100 * mc_variance, "querying z instead of z / s(t) must be detectably wrong"
    score = process.score(make_estimator("exact", random_store, dtype=F64), z, t).reshape(8, -1)
    expected = (reference - z_flat / scale_t) / (scale_t * sigma_t**2)  # Eq. 58
    assert torch.allclose(score, expected, rtol=1e-9, atol=1e-9)


def test_ve_process_is_identity_wrapper(random_store):
    exact = make_estimator("exact", random_store)
    x, z = noisy_batch(random_store, 2.0, count=4)
    z = z.float()
    assert torch.equal(VEProcess().posterior_mean(exact, z, 2.0), exact(z, 2.0))


# -------------------------------------------------------------------------------------- numerics
def _all_estimators(store, index, n=4, k=16, dtype=torch.float32):
    return {
        "single": make_estimator("single", store, dtype=dtype),
        "exact": make_estimator("exact", store, dtype=dtype),
        "mc": make_estimator("mc", store, n=n, dtype=dtype),
        "uniform": make_estimator("uniform", store, n=n, dtype=dtype),
        "stf": make_estimator("stf", store, n=n, dtype=dtype),
        "stf_shared": make_estimator("stf", store, n=max(n, 8), variant="shared", dtype=dtype),
        "knn": make_estimator("knn", store, index=index, k=k, n=n, dtype=dtype),
        "knn_k_ge_n": make_estimator("knn", store, index=index, k=10 * len(store), n=n, dtype=dtype),
        "knn_n1": make_estimator("knn", store, index=index, k=k, n=1, dtype=dtype),
    }


@pytest.mark.parametrize("sigma", [0.002, 0.01, 1.0, 80.0])
def test_no_nan_or_inf_anywhere(sigma):
    # CIFAR-like norms (d = 3,072) make float32 the hard case.
    images = np.random.default_rng(0).integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)
    store = DataStore.from_array(images)
    index = build_index(store, "flat")
    x = store.float(np.arange(8))
    z = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    z[0] = x[0]  # exactly on a data point
    for name, estimator in _all_estimators(store, index).items():
        out = estimator(z, sigma, x=x, generator=torch.Generator().manual_seed(1))
        assert bool(torch.isfinite(out).all()), name
        assert out.shape == z.shape and out.dtype == z.dtype
        if sigma <= 0.01 and name != "uniform":
            # z on x_0: the posterior is a point mass there, every estimator (but blind uniform) finds it.
            assert torch.allclose(out[0], x[0], atol=1e-6), name


def test_generator_makes_draws_reproducible(random_store, flat_index):
    x, z = noisy_batch(random_store, 1.5, count=4)
    z, x = z.float(), x.float()
    for name in ("mc", "uniform", "stf", "knn"):
        kwargs = {"index": flat_index} if name == "knn" else {}
        estimator = make_estimator(name, random_store, n=8, **kwargs)
        first = estimator(z, 1.5, x=x, generator=torch.Generator().manual_seed(5))
        second = estimator(z, 1.5, x=x, generator=torch.Generator().manual_seed(5))
        third = estimator(z, 1.5, x=x, generator=torch.Generator().manual_seed(6))
        assert torch.equal(first, second) and not torch.equal(first, third), name


def test_score_is_eq5(random_store):
    exact = make_estimator("exact", random_store)
    x, z = noisy_batch(random_store, 2.0, count=4)
    z = z.float()
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0])
    assert torch.allclose(exact.score(z, sigma), (exact(z, sigma) - z) / sigma.reshape(-1, 1, 1, 1) ** 2)


def test_stf_variants(random_store):
    x, z = noisy_batch(random_store, 0.01, count=4)
    x, z = x.float(), z.float()
    # At tiny sigma the own source dominates both variants: STF returns x.
    for variant in ("per_sample", "shared"):
        out = make_estimator("stf", random_store, n=8, variant=variant)(z, 0.01, x=x)
        assert torch.allclose(out, x, atol=1e-6), variant
    # Without sources STF is uniform SNIS: same draws from the same generator give the same estimate.
    stf, uniform = make_estimator("stf", random_store, n=8), make_estimator("uniform", random_store, n=8)
    assert torch.equal(stf(z, 2.0, generator=torch.Generator().manual_seed(0)),
                       uniform(z, 2.0, generator=torch.Generator().manual_seed(0)))


def test_network_wrapper_meets_the_contract():
    denoiser = lambda z, sigma: z / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
    estimator = make_estimator("network", denoiser=denoiser)
    z = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(estimator(z, sigma), denoiser(z, sigma))
    assert torch.allclose(estimator.score(z, sigma), -z / (1 + sigma.reshape(-1, 1, 1, 1) ** 2))


def test_combine_duplicates_counts():
    indices = torch.tensor([[3, 1, 3, 3], [2, 2, 2, 2]])
    unique, log_weights = combine_duplicates(indices, torch.zeros(2, 4))
    assert unique.tolist() == [[1, 3, -1, -1], [2, -1, -1, -1]]
    assert torch.allclose(log_weights.exp(), torch.tensor([[1.0, 3.0, 0, 0], [4.0, 0, 0, 0]]))


def test_snis_mean_both_distance_paths_match_float64(random_store, data64):
    """A batch mixing small sigma (direct differences) and large sigma (GEMM distances), with padding
    and duplicate-free random draws, against a float64 brute force of Eq. 11."""
    rows = random_store.resident("cpu", torch.float32)
    generator = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 5.0, 20.0, 80.0, 80.0])
    sources = torch.randint(0, len(random_store), (len(sigma),), generator=generator)
    noise = torch.randn(len(sigma), data64.shape[1], generator=generator, dtype=F64)
    z64 = data64[sources] + sigma.to(F64).reshape(-1, 1) * noise
    indices = torch.stack([torch.randperm(len(random_store), generator=generator)[:40] for _ in sigma])
    indices[:, 0] = sources  # the source is among the draws, so small sigma has a dominant element
    indices[::2, 30:] = -1  # padding
    log_weights = torch.randn(indices.shape, generator=generator)
    z = z64.float()
    paths = gemm_is_accurate(z.square().sum(1), sigma, rows.max_sq_norm)
    assert paths.any() and not paths.all(), "the batch must exercise both distance paths"

    estimate = snis_mean(z, sigma, rows, indices, log_weights)

    valid = indices >= 0
    gathered = data64[indices.clamp(min=0)]
    log_w = log_weights.to(F64) - (gathered - z.to(F64)[:, None]).square().sum(-1) / (2 * sigma.to(F64)[:, None] ** 2)
    weights = torch.softmax(log_w.masked_fill(~valid, -math.inf), dim=1)
    reference = (weights[:, :, None] * gathered).sum(1)
    assert torch.allclose(estimate.to(F64), reference, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- bad input
def test_unknown_estimator(random_store):
    with pytest.raises(ValueError, match="unknown estimator 'kNN'; allowed: .*exact.*knn.*single"):
        make_estimator("kNN", random_store)


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"k": -3}, "k must be"),
    ({"k": 2.5}, "k must be"),
    ({"n": 0}, "n must be an integer >= 1, got 0"),
])
def test_bad_k_and_n(random_store, flat_index, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_estimator("knn", random_store, index=flat_index, **kwargs)


@pytest.mark.parametrize("name", ["mc", "uniform", "stf"])
def test_bad_n_for_sampling_estimators(random_store, name):
    with pytest.raises(ValueError, match="n must be"):
        make_estimator(name, random_store, n=0)


@pytest.mark.parametrize("sigma, message", [
    (0.0, "sigma must be finite and > 0, got 0.0"),
    (-1.0, "got -1.0"),
    (float("nan"), "got nan"),
    (float("inf"), "got inf"),
    (torch.tensor([1.0, 2.0]), "one entry per sample"),
])
def test_bad_sigma(random_store, sigma, message):
    estimator = make_estimator("exact", random_store)
    with pytest.raises(ValueError, match=message):
        estimator(torch.zeros(3, 3, 4, 4), sigma)


def test_z_shape_must_match_the_store(random_store):
    with pytest.raises(ValueError, match=r"z has shape \(2, 3, 8, 8\).*\(3, 4, 4\)"):
        make_estimator("exact", random_store)(torch.zeros(2, 3, 8, 8), 1.0)


def test_index_built_for_other_data(random_store, clustered_store):
    with pytest.raises(ValueError, match="index was built for other data"):
        make_estimator("knn", random_store, index=build_index(clustered_store, "flat"))
    with pytest.raises(ValueError, match="needs an index"):
        make_estimator("knn", random_store)


def test_missing_source_and_store(random_store):
    with pytest.raises(ValueError, match="needs the clean source x"):
        make_estimator("single", random_store)(torch.zeros(2, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match="needs a DataStore"):
        make_estimator("exact")
    with pytest.raises(ValueError, match="x must have the shape of z"):
        make_estimator("stf", random_store)(torch.zeros(2, 3, 4, 4), 1.0, x=torch.zeros(3, 3, 4, 4))


def test_registry_lists_every_estimator():
    assert {"single", "exact", "mc", "uniform", "stf", "knn", "network", "ls", "els", "pspc_square", "cfdm",
            "gaussian"} <= set(estimator_names())


def test_repeated_matches_the_estimators_distribution(random_store, flat_index):
    """``repeated`` shares the search / exact posterior across repeats but draws like separate calls."""
    sigma = 1.5
    x, z = noisy_batch(random_store, sigma, count=4)
    z, x = z.float(), x.float()
    reference = make_estimator("exact", random_store)(z, sigma)
    for name in ("knn", "mc", "stf", "single"):
        kwargs = {"index": flat_index, "k": 64} if name == "knn" else {}
        estimator = make_estimator(name, random_store, **({"n": 16} if name != "single" else {}), **kwargs)
        draws = estimator.repeated(z, sigma, 64, x=x, generator=torch.Generator().manual_seed(0))
        calls = torch.stack([estimator(z, sigma, x=x, generator=torch.Generator().manual_seed(seed))
                             for seed in range(1, 65)])
        assert draws.shape == (64, *z.shape)
        repeated_mse = (draws - reference).square().mean().item()
        calls_mse = (calls - reference).square().mean().item()
        assert repeated_mse == pytest.approx(calls_mse, rel=0.35, abs=1e-9), name
        if name != "single":
            assert not torch.equal(draws[0], draws[1]), f"{name}: repeats must be independent draws"


# ------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_inputs_are_refused(random_store, flat_index, dtype):
    """Integer pixels would be answered in their dtype (-1 becoming 255): refused with the fix named."""
    z = torch.zeros(2, 3, 4, 4, dtype=dtype)
    for _name, estimator in _all_estimators(random_store, flat_index).items():
        with pytest.raises(ValueError, match=f"z must be a floating-point tensor.*{dtype}.*uint8_to_float"):
            estimator(z, 1.0, x=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        make_estimator("stf", random_store)(torch.zeros(2, 3, 4, 4), 1.0, x=torch.zeros(2, 3, 4, 4, dtype=dtype))


@pytest.mark.parametrize("sigma", [1e-20, 1e-30, torch.tensor([1.0, 1e-25])])
def test_sigma_below_the_float32_floor_is_a_clear_error(random_store, flat_index, sigma):
    z = torch.zeros(2, 3, 4, 4)
    for _name, estimator in _all_estimators(random_store, flat_index).items():
        with pytest.raises(ValueError, match=r"sigma must be >= 1.08e-19 for torch.float32 weights"):
            estimator(z, sigma, x=z)


@pytest.mark.parametrize("dtype, sigma", [(torch.float32, 2e-19), (torch.float32, 1e-12), (F64, 1e-30)])
def test_sigma_just_above_the_floor_gives_finite_answers(random_store, flat_index, dtype, sigma):
    """Weights measured from each query's nearest candidate: no 0 / 0 or all -inf down to the floor."""
    x = random_store.float(np.arange(4), dtype=dtype)
    z = x.clone()
    z[1:] += 0.01  # off the data points: every likelihood but the nearest's underflows
    for name, estimator in _all_estimators(random_store, flat_index, dtype=dtype).items():
        out = estimator(z, sigma, x=x, generator=torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(out).all()), name
        if name not in ("uniform",):
            assert torch.allclose(out[0], x[0]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_x_is_refused(random_store, flat_index, bad):
    x = torch.zeros(2, 3, 4, 4)
    x[1, 0, 0, 0] = bad
    for name in ("single", "stf", "knn"):
        estimator = _all_estimators(random_store, flat_index)[name]
        with pytest.raises(ValueError, match="x holds NaN or inf values"):
            estimator(torch.zeros(2, 3, 4, 4), 1.0, x=x)


def test_k_beyond_the_dataset_is_said_once_and_set_to_n(random_store, flat_index, caplog):
    """sample.py's default k 2,048 on digits (N 1,797) was clamped without a word."""
    with caplog.at_level("WARNING"):
        knn = make_estimator("knn", random_store, index=flat_index, k=10 * len(random_store), n=8)
    assert knn.k == len(random_store)
    assert [record.getMessage() for record in caplog.records] == [
        f"k={10 * len(random_store)} exceeds the dataset size N={len(random_store)}: the knn estimator searches all "
        f"{len(random_store)} elements (k = N, the exact posterior)"]
