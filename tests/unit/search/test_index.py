"""faiss indexes: exactness of flat, recall of approximate kinds, the cache, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.search import IndexSpec, build_index


def _true_neighbours(store, queries):
    rows = store.float().reshape(len(store), -1).double()
    return torch.cdist(queries.double(), rows).argmin(dim=1)


def test_flat_returns_sorted_exact_squared_distances(random_store):
    index = build_index(random_store, "flat")
    queries = random_store.float(np.arange(10)).reshape(10, -1) + 0.1 * torch.randn(10, 48)
    sq_dists, indices = index.search(queries, 5)
    assert sq_dists.shape == (10, 5) and indices.dtype == torch.int64
    assert torch.equal(indices[:, 0], _true_neighbours(random_store, queries))
    exact = (random_store.float(indices.reshape(-1)).reshape(10, 5, -1) - queries[:, None]).square().sum(-1)
    assert torch.allclose(sq_dists, exact, rtol=1e-4, atol=1e-3)
    assert bool((sq_dists[:, 1:] >= sq_dists[:, :-1]).all())


def test_k_larger_than_n_is_clamped():
    store = DataStore.from_array(np.random.default_rng(0).integers(0, 256, (7, 1, 2, 2), dtype=np.uint8))
    sq_dists, indices = build_index(store, "flat").search(torch.zeros(2, 4), 50)
    assert indices.shape == (2, 7) and sorted(indices[0].tolist()) == list(range(7))


@pytest.mark.parametrize("kind, nprobe", [("ivf", 8), ("sq8", None), ("ivf_sq8", 8)])
def test_approximate_kinds_find_the_nearest_neighbour(clustered_store, kind, nprobe):
    """Recall@1 >= 95% on a clustered dataset: nlist 40, nprobe 8 for the IVF kinds."""
    nlist = 40 if kind.startswith("ivf") else None
    index = build_index(clustered_store, kind, nlist=nlist, nprobe=nprobe, cache=False)
    generator = torch.Generator().manual_seed(0)
    sources = clustered_store.float(np.arange(0, 4000, 8)).reshape(500, -1)
    queries = sources + 0.05 * torch.randn(sources.shape, generator=generator)
    _, indices = index.search(queries, 10)
    recall = (indices[:, 0] == _true_neighbours(clustered_store, queries)).float().mean().item()
    assert recall >= 0.95, f"{kind}: recall@1 {recall:.3f}"


def test_ivf_may_return_fewer_than_k_marked_missing(clustered_store):
    index = build_index(clustered_store, "ivf", nlist=40, nprobe=1, cache=False)
    sq_dists, indices = index.search(clustered_store.float([0]).reshape(1, -1), 2000)
    missing = indices < 0
    assert bool(missing.any()), "one IVF cell should hold fewer than 2,000 of 4,000 elements"
    assert bool(torch.isinf(sq_dists[missing]).all()) and bool(torch.isfinite(sq_dists[~missing]).all())


def test_nprobe_setter_validates(clustered_store):
    index = build_index(clustered_store, "ivf", nlist=40, nprobe=2, cache=False)
    index.nprobe = 40
    assert index.nprobe == 40
    with pytest.raises(ValueError, match="nprobe"):
        index.nprobe = 41
    with pytest.raises(ValueError, match="nprobe"):
        build_index(clustered_store, "flat").nprobe = 3


def test_cache_is_reused_verified_and_rebuilt(clustered_store, tmp_path, caplog):
    first = build_index(clustered_store, "ivf", nlist=16, cache=True, cache_folder=tmp_path)
    files = sorted(tmp_path.glob("*.faiss"))
    assert len(files) == 1 and files[0].with_suffix(".json").exists()
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"
    stamp = files[0].stat().st_mtime_ns
    build_index(clustered_store, "ivf", nlist=16, cache=True, cache_folder=tmp_path)
    assert files[0].stat().st_mtime_ns == stamp, "a valid cache is loaded, not rebuilt"
    # A cache whose metadata names other data is rebuilt, never used.
    meta = json.loads(files[0].with_suffix(".json").read_text())
    files[0].with_suffix(".json").write_text(json.dumps(meta | {"fingerprint": "other"}))
    with caplog.at_level("WARNING"):
        rebuilt = build_index(clustered_store, "ivf", nlist=16, cache=True, cache_folder=tmp_path)
    assert "does not match" in caplog.text and rebuilt.size == first.size
    # A corrupted file fails its digest and is rebuilt too.
    files[0].write_bytes(files[0].read_bytes()[:-10] + b"0123456789")
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_index(clustered_store, "ivf", nlist=16, cache=True, cache_folder=tmp_path)
    assert "does not match" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "hnsw"}, "unknown index kind"),
    ({"kind": "ivf", "nlist": 0}, "nlist"),
    ({"kind": "flat", "nlist": 4}, "IVF"),
    ({"kind": "ivf", "nlist": 10_000}, "exceeds"),
    ({"kind": "flat", "device": "tpu"}, "device"),
])
def test_bad_index_input(random_store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_index(random_store, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_gpu_requested_without_cuda_is_a_clear_error(random_store):
    with pytest.raises(ValueError, match="CUDA"):
        build_index(random_store, "flat", device="cuda")


def test_search_rejects_wrong_dimension_and_k(random_store):
    index = build_index(random_store, "flat")
    with pytest.raises(ValueError, match="dimension"):
        index.search(torch.zeros(2, 47), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.zeros(2, 48), 0)


def test_spec_defaults():
    spec = IndexSpec("ivf").resolved(50000)
    assert spec.nlist == 894 and spec.nprobe == 55 and spec.train_size == 50000
