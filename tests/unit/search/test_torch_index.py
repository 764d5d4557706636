"""The torch index (kind ``torch``): equal to faiss flat up to ties, low-precision search, storages, projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.data.resident import resolve_storage
from knn_cm.estimators import make_estimator
from knn_cm.search import IndexSpec, build_index
from tests.conftest import clustered_images_store


@pytest.fixture(scope="module")
def cifar_sized_store() -> DataStore:
    """N = 3,000 images of CIFAR-10's shape (3, 32, 32) in 30 clusters, so neighbours are meaningful."""
    return clustered_images_store(3000, (3, 32, 32), clusters=30, centre_range=(30, 225), spread=25, seed=7,
                                  name="cifar_sized")


def _queries(store, sigma: float, count: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = store.float(torch.randperm(len(store), generator=generator)[:count])
    return (x + sigma * torch.randn(x.shape, generator=generator)).reshape(count, -1)


def _assert_same_neighbours_up_to_ties(reference, candidate, tolerance):
    """Equal sorted distances, and any index that differs sits at a distance tied (within tolerance)
    with the k-th: a different but equally near element."""
    (ref_d, ref_i), (cand_d, cand_i) = reference, candidate
    assert torch.allclose(cand_d, ref_d, rtol=1e-5, atol=tolerance)
    for row in range(ref_i.shape[0]):
        differ = set(ref_i[row].tolist()) ^ set(cand_i[row].tolist())
        kth = ref_d[row, -1]
        for element in differ:
            where = (ref_i[row] == element).nonzero()
            dist = ref_d[row, where[0, 0]] if len(where) else cand_d[row, (cand_i[row] == element).nonzero()[0, 0]]
            assert abs(float(dist - kth)) <= tolerance, (row, element, float(dist), float(kth))


@pytest.mark.parametrize("sigma", [0.01, 1.0, 20.0])
def test_torch_index_equals_faiss_flat(cifar_sized_store, sigma):
    """float32, several top-k chunks (chunk_rows 700 < N): the neighbours of faiss flat, ties aside."""
    queries = _queries(cifar_sized_store, sigma)
    faiss_result = build_index(cifar_sized_store, "flat").search(queries, 200)
    torch_index = build_index(cifar_sized_store, "torch", chunk_rows=700)
    torch_result = torch_index.search(queries, 200)
    assert torch_result[1].dtype == torch.int64 and torch_result[0].dtype == torch.float32
    assert bool((torch_result[0][:, 1:] >= torch_result[0][:, :-1]).all()), "nearest first"
    # float32 GEMM distances of both libraries differ by a few eps * (||q||^2 + ||x||^2).
    tolerance = 32 * torch.finfo(torch.float32).eps * float(queries.square().sum(1).max() + 3072)
    _assert_same_neighbours_up_to_ties(faiss_result, torch_result, tolerance)


def test_torch_index_storages_and_chunks_agree(cifar_sized_store):
    """uint8 and mapped storages (converted a chunk at a time) and chunk sizes change nothing."""
    queries = _queries(cifar_sized_store, 2.0, count=8)
    reference = build_index(cifar_sized_store, "torch", storage="float").search(queries, 64)
    for storage, chunk_rows in (("uint8", None), ("mapped", 333), ("float", 64)):
        index = build_index(cifar_sized_store, "torch", storage=storage, chunk_rows=chunk_rows)
        dists, indices = index.search(queries, 64)
        assert torch.equal(indices, reference[1]), storage
        assert torch.allclose(dists, reference[0], rtol=1e-5, atol=1e-2), storage


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_low_precision_search_finds_nearly_the_same_neighbours(cifar_sized_store, precision):
    """Unit-scaled queries keep float16 products in range even at sigma 80 (||z||^2 ~ 2e7)."""
    for sigma in (0.5, 80.0):
        queries = _queries(cifar_sized_store, sigma, count=8)
        exact_d, exact_i = build_index(cifar_sized_store, "torch").search(queries, 64)
        dists, indices = build_index(cifar_sized_store, "torch", precision=precision).search(queries, 64)
        assert bool(torch.isfinite(dists).all())
        overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 64 for a, b in zip(exact_i, indices)])
        assert overlap >= (0.9 if precision == "float16" else 0.5), (sigma, overlap)
        relative = ((dists - exact_d).abs() / exact_d.clamp(min=1.0)).max().item()
        assert relative < (2e-3 if precision == "float16" else 2e-2), (sigma, relative)


def test_float16_search_stays_accurate_where_query_dot_products_exceed_float16(cifar_sized_store):
    """Queries aligned with the data at a large scale (pixel-scale inputs, 300 z) make |q.x| pass float16's
    largest value 65,504 for every neighbour; unit-scaled queries keep the products in range. Without the
    scaling the overlap with the exact neighbours falls to 8-65% here."""
    generator = torch.Generator().manual_seed(0)
    x = cifar_sized_store.float(torch.randperm(len(cifar_sized_store), generator=generator)[:8]).reshape(8, -1)
    rows = cifar_sized_store.float().reshape(len(cifar_sized_store), -1)
    exact_index = build_index(cifar_sized_store, "torch")
    float16_index = build_index(cifar_sized_store, "torch", precision="float16")
    for name, queries in (("pixel scale", (x + 1.0) * 127.5),
                          ("300 z, sigma 0.5", 300 * (x + 0.5 * torch.randn(x.shape, generator=generator))),
                          ("300 z, sigma 20", 300 * (x + 20 * torch.randn(x.shape, generator=generator)))):
        exact_d, exact_i = exact_index.search(queries, 64)
        dots = (queries.unsqueeze(1) @ rows[exact_i].transpose(1, 2)).abs()
        assert float(dots.min()) > torch.finfo(torch.float16).max, name  # the case the scaling exists for
        dists, indices = float16_index.search(queries, 64)
        assert bool(torch.isfinite(dists).all()), name
        overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 64 for a, b in zip(exact_i, indices)])
        assert overlap >= 0.9, (name, overlap)


def test_float16_proposal_estimates_within_the_estimators_noise(cifar_sized_store):
    """KNN on a float16 search: the proposal changes, the weights stay exact; the estimates' error
    against the exact posterior matches float32's within Monte-Carlo noise, at every sigma."""
    exact = make_estimator("exact", cifar_sized_store)
    indexes = {p: build_index(cifar_sized_store, "torch", precision=p) for p in ("float32", "float16")}
    for sigma in (0.01, 5.0, 80.0):
        z = _queries(cifar_sized_store, sigma, count=16, seed=3).reshape(16, 3, 32, 32)
        reference = exact(z, sigma)
        errors = {}
        for precision, index in indexes.items():
            knn = make_estimator("knn", cifar_sized_store, index=index, k=128, n=32)
            draws = knn.repeated(z, sigma, 12, generator=torch.Generator().manual_seed(0))  # one search
            errors[precision] = (draws - reference).square().mean(dim=(1, 2, 3, 4)).numpy()
        f32, f16 = errors["float32"], errors["float16"]
        noise = 3 * np.sqrt(f32.var() / len(f32) + f16.var() / len(f16))
        assert abs(f16.mean() - f32.mean()) <= noise + 1e-9, (sigma, f32.mean(), f16.mean())


def test_projected_search_reranks_exactly_and_refits_identically(cifar_sized_store):
    queries = _queries(cifar_sized_store, 1.0, count=8)
    first = build_index(cifar_sized_store, "torch", project_dim=16, rerank=128)
    again = build_index(cifar_sized_store, "torch", project_dim=16, rerank=128)
    assert torch.equal(first.projection.basis, again.projection.basis), "a refit gives the same basis"
    dists, indices = first.search(queries, 32)
    exact = (cifar_sized_store.float(indices.reshape(-1)).reshape(8, 32, -1) - queries[:, None]).square().sum(-1)
    assert torch.allclose(dists, exact, rtol=1e-4, atol=0.5), "reranked distances are exact"
    true_d, true_i = build_index(cifar_sized_store, "torch").search(queries, 32)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 32 for a, b in zip(true_i, indices)])
    assert recall >= 0.9, recall
    # Without rerank the ranking is by reduced-space estimates (no cross term): here the within-cluster
    # spread is isotropic, invisible to 16 components, so recall is lower, but far above chance (1%).
    _, plain = build_index(cifar_sized_store, "torch", project_dim=16).search(queries, 32)
    assert np.mean([len(set(a.tolist()) & set(b.tolist())) / 32 for a, b in zip(true_i, plain)]) >= 0.2


def test_projected_faiss_ivf_probing_every_cell_is_the_torch_projected_search(cifar_sized_store):
    """IVF over the same projected vectors with nprobe = nlist is exhaustive: the torch result, ties aside."""
    queries = _queries(cifar_sized_store, 1.0, count=8)
    ivf = build_index(cifar_sized_store, "ivf", nlist=30, nprobe=30, project_dim=16, rerank=64)
    flat = build_index(cifar_sized_store, "torch", project_dim=16, rerank=64)
    ivf_d, ivf_i = ivf.search(queries, 32)
    flat_d, flat_i = flat.search(queries, 32)
    assert torch.allclose(ivf.projection.basis, flat.projection.basis)
    assert np.mean([len(set(a.tolist()) & set(b.tolist())) / 32 for a, b in zip(ivf_i, flat_i)]) >= 0.97
    assert torch.allclose(ivf_d, flat_d, rtol=1e-4, atol=0.5)
    ivf.nprobe = 6  # fewer cells: fewer true neighbours, never a wrong distance
    few_d, few_i = ivf.search(queries, 32)
    exact = (cifar_sized_store.float(few_i.reshape(-1)).reshape(8, 32, -1) - queries[:, None]).square().sum(-1)
    assert torch.allclose(few_d, exact, rtol=1e-4, atol=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "torch", "precision": "float8"}, "precision must be one of float32, float16, bfloat16"),
    ({"kind": "flat", "precision": "float16"}, "applies to the 'torch' kind"),
    ({"kind": "torch", "rerank": 10}, "set project_dim"),
    ({"kind": "torch", "project_dim": 0}, "project_dim must be"),
    ({"kind": "torch", "storage": "bytes"}, "storage must be one of"),
])
def test_bad_torch_index_input(cifar_sized_store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_index(cifar_sized_store, **kwargs)


def test_mapped_storage_needs_the_cpu():
    with pytest.raises(ValueError, match="'mapped'.*needs device 'cpu'"):
        resolve_storage("mapped", torch.device("cuda"), 10, 10, torch.float32)
    assert resolve_storage("auto", torch.device("cuda"), 10, 10, torch.float32) == "uint8"
    assert resolve_storage("auto", torch.device("cpu"), 10, 10, torch.float32) == "float"
    assert resolve_storage("auto", torch.device("cpu"), 1 << 20, 3072, torch.float32) == "mapped"


def test_spec_of_projected_kinds():
    spec = IndexSpec("torch", project_dim=64, rerank=512).resolved(50_000)
    assert spec.train_size is None and "project_dim64" in spec.cache_key()


@pytest.mark.parametrize("name, kind", [("torch", "torch"), ("approximate", "ivf")])
def test_index_configs_build(cifar_sized_store, name, kind):
    from pathlib import Path

    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).resolve().parents[3] / "configs" / "train" / "index" / f"{name}.yaml")
    if name == "approximate":
        config.nlist = 30  # 4 sqrt(N) would leave too few elements per cell for k-means on 3,000
    index = build_index(cifar_sized_store, **OmegaConf.to_container(config))
    assert index.kind == kind and index.size == len(cifar_sized_store)
    if name == "approximate":
        assert index.projection is not None and index.spec.rerank == 512
