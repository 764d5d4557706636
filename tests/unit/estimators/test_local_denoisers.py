"""The local empirical denoisers (ls, els, pspc_square, cfdm, gaussian) against independent float64 brute forces.

The brute forces below take windows with torch.nn.functional.pad / unfold and loop over crops, sharing no code
with knn_cm.estimators.patches / filtered. Every comparison is paired with a wrong variant (another padding,
patch size, combiner or smoothing) that must differ at the same points, so each test can fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from knn_cm.data import DataStore
from knn_cm.estimators import build_estimator, make_estimator
from knn_cm.estimators.patches import PatchSchedule

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "train" / "estimator"
F64 = torch.float64
SIGMAS = [0.5, 1.0, 3.0]
SHAPE = (2, 5, 6)  # non-square, so height and width cannot be swapped unnoticed
TIGHT = 1e-10  # float64 estimator against float64 brute force
APART = 1e-3  # a wrong variant differs by at least this much (max over the tested points)


@pytest.fixture(scope="module")
def store() -> DataStore:
    images = np.random.default_rng(0).integers(0, 256, (24, *SHAPE), dtype=np.uint8)
    return DataStore.from_array(images, name="local")


def images_of(store: DataStore) -> torch.Tensor:
    """Every element as float64 [N, C, H, W], x-flipped copies made explicitly (np.flip), not virtually."""
    base = torch.from_numpy(store.images.astype(np.float64) / 127.5 - 1.0)
    return torch.cat([base, base.flip(-1)]) if store.xflip else base


def noisy(store: DataStore, sigma: float, count: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = images_of(store)[torch.randperm(len(store), generator=generator)[:count]]
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=F64)


def precision(patch_size: int, window: str, std: float | None = None) -> torch.Tensor:
    """lambda over a centred patch_size^2 window, row-major: [p * p]."""
    offsets = torch.arange(patch_size, dtype=F64) - patch_size // 2
    if window == "square":
        return torch.ones(patch_size * patch_size, dtype=F64)
    std = patch_size / 4 if std is None else std
    return torch.exp(-(offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2) / (2 * std**2)).reshape(-1)


def unfold(images: torch.Tensor, patch_size: int, padding: str) -> torch.Tensor:
    """Windows around every pixel [M, H * W, C, p * p] by padding then F.unfold."""
    r = patch_size // 2
    mode = "circular" if padding == "circular" else "constant"
    padded = F.pad(images, (r, r, r, r), mode=mode)
    columns = F.unfold(padded, patch_size)  # [M, C * p * p, H * W]
    return columns.view(images.shape[0], images.shape[1], patch_size * patch_size, -1).permute(0, 3, 1, 2)


def brute_ls(data, z, sigma, patch_size, window="square", padding="zero"):
    lam = precision(patch_size, window)
    zq, xq = unfold(z, patch_size, padding), unfold(data, patch_size, padding)  # [B, HW, C, T], [N, HW, C, T]
    sq = ((zq.unsqueeze(1) - xq.unsqueeze(0)).square() * lam).sum((-1, -2))  # [B, N, HW]
    weights = torch.softmax(-sq / (2 * sigma**2), dim=1)
    return torch.einsum("bnu,ncu->bcu", weights, data.flatten(2)).reshape(z.shape)


def axis_class(coordinate: int, extent: int, radius: int):
    return coordinate if coordinate < radius or coordinate >= extent - radius else "interior"


def brute_els(data, z, sigma, patch_size, padding, window="square"):
    lam = precision(patch_size, window)
    _, channels, height, width = data.shape
    zq = unfold(z, patch_size, padding)  # [B, HW, C, T]
    bank = unfold(data, patch_size, padding)  # [N, HW, C, T]
    centres = data.flatten(2).transpose(1, 2)  # [N, HW, C]
    sq = ((zq.unsqueeze(2).unsqueeze(2) - bank.unsqueeze(0).unsqueeze(0)).square() * lam).sum((-1, -2))
    # sq [B, HW(query), 1, N, HW(bank)] -> [B, HW, N * HW]
    sq = sq.reshape(z.shape[0], height * width, -1)
    if padding == "zero":
        r = patch_size // 2
        cls = [(axis_class(u // width, height, r), axis_class(u % width, width, r)) for u in range(height * width)]
        allowed = torch.tensor([[cls[u] == cls[v] for v in range(height * width)] for u in range(height * width)])
        sq = sq.masked_fill(~allowed.repeat(1, data.shape[0]).unsqueeze(0), float("inf"))
    weights = torch.softmax(-sq / (2 * sigma**2), dim=-1)
    return (weights @ centres.reshape(-1, channels)).transpose(1, 2).reshape(z.shape)


def brute_pspc(data, z, sigma, patch_size):
    _, _, height, width = data.shape
    total, count = torch.zeros_like(z), torch.zeros(height, width, dtype=F64)
    for top in range(height - patch_size + 1):
        for left in range(width - patch_size + 1):
            crop = (slice(None), slice(None), slice(top, top + patch_size), slice(left, left + patch_size))
            zc, xc = z[crop].flatten(1), data[crop].flatten(1)
            weights = torch.softmax(-torch.cdist(zc, xc).square() / (2 * sigma**2), dim=1)
            total[crop] += (weights @ xc).view_as(z[crop])
            count[crop[2:]] += 1
    return total / count


def brute_posterior(data, z, sigma):
    flat = data.flatten(1)
    weights = torch.softmax(-torch.cdist(z.flatten(1), flat).square() / (2 * sigma**2), dim=1)
    return (weights @ flat).view_as(z)


def estimate(store, name, z, sigma, generator=None, **kwargs):
    return make_estimator(name, store, dtype=F64, **kwargs)(z, sigma, generator=generator)


def assert_matches_and_wrong_differs(got, expected, wrong):
    assert (got - expected).abs().max() < TIGHT
    assert (wrong - expected).abs().max() > APART, "the wrong variant must differ where the test looks"


@pytest.mark.parametrize("window", ["square", "gaussian"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_ls_equals_brute_force(store, sigma, window):
    data, z = images_of(store), noisy(store, sigma)
    expected = brute_ls(data, z, sigma, 3, window)
    wrong = brute_ls(data, z, sigma, 3, window, padding="circular")  # a wrapped instead of truncated window
    assert_matches_and_wrong_differs(estimate(store, "ls", z, sigma, patch_size=3, window=window), expected, wrong)


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_els_equals_brute_force(store, sigma, padding):
    data, z = images_of(store), noisy(store, sigma)
    expected = brute_els(data, z, sigma, 3, padding)
    wrong = brute_els(data, z, sigma, 3, "zero" if padding == "circular" else "circular")
    assert_matches_and_wrong_differs(estimate(store, "els", z, sigma, patch_size=3, padding=padding), expected, wrong)


def test_els_soft_window_and_x_flips_equal_brute_force(store):
    """The Gaussian window, a larger patch and virtual x-flips (read mirrored, never held) at once."""
    flipped = store.with_xflip()
    data, z, sigma = images_of(flipped), noisy(flipped, 1.0), 1.0
    for padding in ("circular", "zero"):
        expected = brute_els(data, z, sigma, 5, padding, window="gaussian")
        wrong = brute_els(images_of(store), z, sigma, 5, padding, window="gaussian")  # without the flipped half
        got = estimate(flipped, "els", z, sigma, patch_size=5, padding=padding, window="gaussian")
        assert_matches_and_wrong_differs(got, expected, wrong)


@pytest.mark.parametrize("patch_size", [2, 3, 5])
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_pspc_square_equals_brute_force(store, sigma, patch_size):
    data, z = images_of(store), noisy(store, sigma)
    expected = brute_pspc(data, z, sigma, patch_size)
    wrong = brute_pspc(data, z, sigma, patch_size - 1 if patch_size > 2 else 3)
    assert_matches_and_wrong_differs(estimate(store, "pspc_square", z, sigma, patch_size=patch_size), expected, wrong)


def test_pspc_square_larger_than_the_image_is_the_posterior_mean(store):
    data, z = images_of(store), noisy(store, 3.0)
    expected = brute_posterior(data, z, 3.0)
    wrong = brute_pspc(data, z, 3.0, 4)
    assert_matches_and_wrong_differs(estimate(store, "pspc_square", z, 3.0, patch_size=32), expected, wrong)


@pytest.mark.parametrize("sigma", [1.5, 3.0, 6.0])
def test_cfdm_equals_brute_force(store, sigma):
    data, z = images_of(store), noisy(store, sigma)
    draws, smoothing = 5, 0.4
    jitter = torch.randn((draws, *z.shape), generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = torch.stack([brute_posterior(data, z + smoothing * eps, sigma) for eps in jitter]).mean(0)
    wrong = brute_posterior(data, z, sigma)  # no smoothing
    got = estimate(store, "cfdm", z, sigma, torch.Generator().manual_seed(3), smoothing=smoothing, draws=draws)
    assert_matches_and_wrong_differs(got, expected, wrong)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 10.0])
def test_gaussian_equals_the_linear_solve(store, sigma):
    data, z = images_of(store).flatten(1), noisy(store, sigma).flatten(1)
    mean = data.mean(0)
    covariance = (data - mean).T @ (data - mean) / data.shape[0]
    solve = lambda var: mean + (covariance @ torch.linalg.solve(covariance + var * torch.eye(data.shape[1],
                                                                                            dtype=F64),
                                                                (z - mean).T)).T
    got = estimate(store, "gaussian", z.view(-1, *SHAPE), sigma).flatten(1)
    assert_matches_and_wrong_differs(got, solve(sigma**2), solve(sigma))


# ----------------------------------------------------------------------------------------- the streamed form
def test_the_streamed_form_does_not_depend_on_the_batching(store):
    """Chunks of 1, 5, 7 and all 24 elements give one result; averaging per chunk (the defect FACTS.md warns
    of in the public ELS code) would not, so the chunk sizes tested do cut the bank differently."""
    sigma = 1.0
    z = noisy(store, sigma)
    for name, kwargs in [("ls", {}), ("els", {"padding": "circular"}), ("els", {"padding": "zero"}),
                         ("pspc_square", {})]:
        results = [estimate(store, name, z, sigma, patch_size=3, chunk_elements=chunk, **kwargs)
                   for chunk in (1, 5, 7, 24)]
        for result in results[1:]:
            assert (result - results[0]).abs().max() < 1e-12, name
    data = images_of(store)
    lam = precision(3, "square")
    zq, xq = unfold(z, 3, "zero"), unfold(data, 3, "zero")
    logits = -((zq.unsqueeze(1) - xq.unsqueeze(0)).square() * lam).sum((-1, -2)) / (2 * sigma**2)  # [B, N, HW]

    def averaged_per_chunk(chunk):
        means = [torch.einsum("bnu,ncu->bcu", torch.softmax(logits[:, s : s + chunk], 1),
                              data[s : s + chunk].flatten(2)) for s in range(0, data.shape[0], chunk)]
        return torch.stack(means).mean(0)

    assert (averaged_per_chunk(5) - averaged_per_chunk(24)).abs().max() > APART


def test_a_float32_estimator_agrees_with_the_brute_force(store):
    data, z, sigma = images_of(store), noisy(store, 0.5), 0.5
    got = make_estimator("els", store, patch_size=3)(z.float(), sigma).double()
    assert (got - brute_els(data, z, sigma, 3, "circular")).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- KNN forms
KNN_CASES = [("ls", {}), ("els", {"padding": "circular"}), ("els", {"padding": "zero"}), ("pspc_square", {}),
             ("cfdm", {"smoothing": 0.2, "draws": 2})]


def _knn_error(store, name, kwargs, z, sigma, k, n, seeds=4):
    exhaustive = estimate(store, name, z, sigma, torch.Generator().manual_seed(0), **kwargs)
    errors = [(estimate(store, name, z, sigma, torch.Generator().manual_seed(0) if name == "cfdm" else
                        torch.Generator().manual_seed(seed), k=k, n=n, **kwargs) - exhaustive).square().mean()
              for seed in range(seeds)]
    return float(torch.stack(errors).mean())


@pytest.mark.parametrize(("name", "kwargs"), KNN_CASES, ids=[f"{n}-{k.get('padding', '')}" for n, k in KNN_CASES])
def test_knn_forms_converge_to_the_exhaustive_form_as_k_grows(store, name, kwargs):
    """cfdm keeps seed 0 (its jitter is the generator's first draw), so only the search differs there."""
    sigma, z = 2.0, noisy(store, 2.0)
    errors = [_knn_error(store, name, kwargs, z, sigma, k, n=2) for k in (1, 4, 16)]
    full = _knn_error(store, name, kwargs, z, sigma, k=10**9, n=2)
    assert errors[0] > 1e-5, "the smallest k must be measurably off, or the test could not fail"
    assert errors[2] < errors[1] < errors[0]
    assert full < 1e-24  # k >= M: every source enters exactly, the tail is empty


def test_knn_tail_draws_carry_the_proposal_correction(store):
    """With 2 neighbours and many uniform tail draws the estimate approaches the exhaustive form; a tail weighted
    1 per draw instead of (M - k) / n would converge elsewhere (the sample's weight against the neighbours')."""
    sigma, z = 3.0, noisy(store, 3.0)
    few = _knn_error(store, "ls", {}, z, sigma, k=2, n=4)
    many = _knn_error(store, "ls", {}, z, sigma, k=2, n=4000, seeds=2)
    assert many < few / 50


def test_knn_form_over_x_flips_reads_mirrored_windows(store):
    flipped = store.with_xflip()
    z, sigma = noisy(flipped, 1.0), 1.0
    for padding in ("circular", "zero"):
        expected = brute_els(images_of(flipped), z, sigma, 3, padding)
        got = estimate(flipped, "els", z, sigma, patch_size=3, padding=padding, k=10**9, n=1)
        assert (got - expected).abs().max() < TIGHT


# ------------------------------------------------------------------------------------------------ schedules
def test_a_schedule_picks_the_patch_size_per_sigma(store):
    schedule = [[0.3, 3], [2.0, 5]]
    assert PatchSchedule(schedule).sizes_for(torch.tensor([0.1, 0.7, 0.8, 1.5, 40.0])) == [3, 3, 5, 5, 5]
    assert PatchSchedule({0.3: 3, 2.0: 5}).sizes_for(torch.tensor([0.5])) == [3]
    schedule = [[1.0, 3], [4.0, 5]]
    sigma = torch.tensor([1.2, 3.5, 0.8])
    z = torch.cat([noisy(store, 1.2, count=1, seed=5), noisy(store, 3.5, count=1, seed=6),
                   noisy(store, 0.8, count=1, seed=7)])
    for name, kwargs in [("ls", {}), ("els", {"padding": "zero"}), ("pspc_square", {})]:
        got = estimate(store, name, z, sigma, patch_size=schedule, **kwargs)
        for row, size in zip(range(3), (3, 5, 3)):
            alone = estimate(store, name, z[row : row + 1], sigma[row], patch_size=size, **kwargs)
            other = estimate(store, name, z[row : row + 1], sigma[row], patch_size=8 - size, **kwargs)
            assert (got[row] - alone[0]).abs().max() < TIGHT, (name, row)
            assert (other[0] - alone[0]).abs().max() > APART


def test_a_config_builds_the_knn_form_with_a_schedule(store):
    spec = {"name": "els", "patch_size": [[0.1, 3], [1.0, 5]], "padding": "zero", "k": 8, "n": 4}
    est = build_estimator(spec, store)
    assert est.form == "knn" and est.schedule.sizes == [3, 5]
    assert est(noisy(store, 1.0).float(), 1.0, generator=torch.Generator().manual_seed(0)).shape == (3, *SHAPE)
    assert build_estimator({"name": "ls", "patch_size": 3}, store).form == "exhaustive"


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("ls", {"patch_size": 4}, "patch_size must be odd"),
    ("els", {"padding": "reflect"}, "padding must be one of circular, zero, got 'reflect'"),
    ("els", {"k": 8}, "give both k and n"),
    ("ls", {"window": "round"}, "window must be one of square, gaussian, got 'round'"),
    ("ls", {"window": "gaussian", "window_std": 0}, "window_std must be a positive number"),
    ("pspc_square", {"patch_size": [[0.1, 3], [-1, 5]]}, "every sigma of the table must be a positive number"),
    ("pspc_square", {"patch_size": "big"}, "patch_size must be an integer or a table"),
    ("ls", {"patch_size": 0}, "patch_size sizes must be integers >= 1, got 0"),
    ("cfdm", {"smoothing": -1.0}, "smoothing must be a number >= 0"),
    ("cfdm", {"k": 4, "n": -1}, "n must be an integer >= 0, got -1"),
])
def test_bad_settings_are_refused_in_one_line(store, name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_estimator(name, store, **kwargs)


@pytest.mark.parametrize("name", ["ls", "els", "pspc_square", "cfdm", "gaussian"])
def test_each_denoiser_config_builds_and_estimates(store, name):
    spec = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    est = build_estimator(spec, store)
    z = noisy(store, 1.0).float()
    assert est(z, torch.tensor([0.05, 1.0, 50.0]), generator=torch.Generator().manual_seed(0)).shape == z.shape


# ----------------------------------------------------------------------------------------------- bank indexes
INDEX_CASES = [("ls", {}), ("els", {"padding": "circular"}), ("els", {"padding": "zero"}), ("pspc_square", {}),
               ("cfdm", {"smoothing": 0.2, "draws": 2})]


@pytest.mark.parametrize(("name", "kwargs"), INDEX_CASES, ids=[f"{n}-{k.get('padding', '')}" for n, k in INDEX_CASES])
def test_a_bank_index_probing_every_cell_finds_what_the_exact_scan_finds(store, name, kwargs):
    """Flat lists probed in full hold every source of the query's bucket with its exact distance, so the candidates
    and (from the same generator) the tail draws and the estimate are the exact scan's. A bucket mixed up (a source
    of another location or boundary class returned) would change the candidates."""
    sigma, z = 1.0, noisy(store, 1.0)
    search = {"kind": "ivf", "cells": 3, "nprobe": 3}
    for k in (5, 10**9):  # some neighbours; more than any bucket holds (missing entries)
        exact = estimate(store, name, z, sigma, torch.Generator().manual_seed(2), k=k, n=3, search="exact", **kwargs)
        indexed = estimate(store, name, z, sigma, torch.Generator().manual_seed(2), k=k, n=3, search=search, **kwargs)
        assert (indexed - exact).abs().max() < 1e-12, (name, k)


def test_a_bank_index_over_x_flips_reads_mirrored_windows(store):
    flipped = store.with_xflip()
    z, sigma = noisy(flipped, 1.0), 1.0
    for padding in ("circular", "zero"):
        expected = brute_els(images_of(flipped), z, sigma, 3, padding)
        got = estimate(flipped, "els", z, sigma, patch_size=3, padding=padding, k=10**9, n=1,
                       search={"kind": "ivf_sq8", "cells": 2, "nprobe": 2})
        assert (got - expected).abs().max() < TIGHT


def test_a_coarse_bank_index_stays_consistent_through_the_tail(store):
    """One cell probed of six: the candidates miss most of the posterior, and the uniform tail over everything they
    miss, weighted (M - k') / n, still converges to the exhaustive form as n grows."""
    sigma, z = 3.0, noisy(store, 3.0)
    search = {"kind": "ivf_sq8", "cells": 6, "nprobe": 1}
    few = _knn_error(store, "els", {"search": search}, z, sigma, k=2, n=4)
    many = _knn_error(store, "els", {"search": search}, z, sigma, k=2, n=4000, seeds=2)
    assert many < few / 50


def test_a_bank_index_is_built_once_and_reused_from_the_cache(store, tmp_path):
    search = {"kind": "ivf_sq8", "cells": 4, "cache_folder": str(tmp_path)}
    z = noisy(store, 1.0).float()

    def index_of(**kwargs):
        est = make_estimator("els", store, patch_size=3, k=4, n=4, search=search, **kwargs)
        est(z, 1.0, generator=torch.Generator().manual_seed(0))
        return est.filtered().bank_index(est.layout_for(3))[1]

    first, second = index_of(), index_of()
    assert not first.loaded and second.loaded and first.build_seconds > 0
    assert second.size == first.size == len(store) * SHAPE[1] * SHAPE[2] and second.buckets == 1
    entries = sorted(path.name for path in tmp_path.glob("bank-*.json"))
    assert len(entries) == 1 and store.fingerprint in entries[0] and "els-p3" in entries[0]
    zero = index_of(padding="zero")  # another geometry: its own entry (one bucket per boundary class)
    assert not zero.loaded and zero.buckets == 9 and len(list(tmp_path.glob("bank-*.json"))) == 2
    meta = tmp_path / entries[0]
    meta.write_text(meta.read_text().replace(store.fingerprint, "other"))  # a stale entry is rebuilt, not used
    assert not index_of().loaded


def test_auto_search_scans_small_banks_and_indexes_large_ones(store, monkeypatch):
    import knn_cm.estimators.filtered as filtered

    est = make_estimator("ls", store, patch_size=3, k=4, n=4)
    assert est.filtered().bank_index(est.layout_for(3)) is None  # 24 x 30 sources: scanned
    monkeypatch.setattr(filtered, "AUTO_INDEX_SOURCES", 100)
    est = make_estimator("ls", store, patch_size=3, k=4, n=4)
    bank, index = est.filtered().bank_index(est.layout_for(3))
    assert index.spec.kind == "ivf_sq8" and index.buckets == SHAPE[1] * SHAPE[2] and bank.size == 24 * 30


@pytest.mark.parametrize(("search", "message"), [
    ({"kind": "hnsw"}, "search kind must be one of ivf, ivf_sq8, got 'hnsw'"),
    ({"nlist": 3}, "search.nlist is not a setting of a bank index"),
    ({"cells": 0}, "search cells must be an integer >= 1"),
    (7, "search must be a kind (ivf, ivf_sq8) or a mapping of its settings, got 7"),
])
def test_bad_search_settings_are_refused_in_one_line(store, search, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_estimator("els", store, k=4, n=4, search=search)
