"""The index cache under concurrency and for projected searches: one builder per entry (a file lock; the others
wait and load), and projected indexes (faiss and torch) cached, so a requeued job or another rank does not
rebuild them."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import knn_cm.search.build as index_module
import knn_cm.search.two_stage as two_stage_module
from knn_cm.search import build_index
from knn_cm.search.cache import CacheEntry

pytest.importorskip("faiss")


def _count_calls(monkeypatch, module, name: str, pause: float = 0.0) -> list:
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        time.sleep(pause)  # keeps the builder inside the lock while the others arrive
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _same_results(first, second, store) -> None:
    queries = store.resident("cpu", torch.float32).gather(torch.arange(0, 40, 4)) + 3.0
    for a, b in zip(first.search(queries, 16), second.search(queries, 16)):
        assert torch.equal(a, b)


def test_concurrent_builders_of_one_entry_build_it_once(clustered_store, tmp_path, monkeypatch, caplog):
    """Four ranks of a node asking for one IVF index at once: the first builds it under the entry's lock, the
    others wait for the lock and load what it wrote (before: every rank built its own, or rank 0 built while
    the others waited in a collective under the process-group timeout)."""
    builds = _count_calls(monkeypatch, index_module, "build_faiss_cpu", pause=1.0)
    results = {}

    def rank(number):
        results[number] = build_index(clustered_store, "ivf", nlist=16, cache=True, cache_folder=tmp_path)

    with caplog.at_level("INFO", logger="knn_cm.search"):
        threads = [threading.Thread(target=rank, args=(number,)) for number in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert builds == ["build_faiss_cpu"] and len(results) == 4
    assert "is being built by PID" in caplog.text  # the waiting ranks say whom they wait for
    for number in range(1, 4):
        _same_results(results[0], results[number], clustered_store)


def test_projected_faiss_indexes_are_cached_with_their_projection(clustered_store, tmp_path, monkeypatch):
    fits = _count_calls(monkeypatch, two_stage_module.Projection, "fit")
    builds = _count_calls(monkeypatch, index_module, "build_faiss_cpu")
    kwargs = dict(kind="ivf", nlist=16, nprobe=16, project_dim=8, rerank=64, cache_folder=tmp_path)
    first = build_index(clustered_store, **kwargs)
    again = build_index(clustered_store, **kwargs | {"rerank": 32})  # a search setting: the same entry
    assert fits == ["fit"] and builds == ["build_faiss_cpu"], "a requeued job loads the projected index"
    assert torch.equal(again.projection.basis, first.projection.basis) and again.spec.rerank == 32
    _same_results(first, build_index(clustered_store, **kwargs), clustered_store)
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".faiss", ".json", ".lock", ".pt"]


def test_projected_torch_indexes_cache_their_projection(clustered_store, tmp_path, monkeypatch):
    fits = _count_calls(monkeypatch, two_stage_module.Projection, "fit")
    first = build_index(clustered_store, "torch", project_dim=8, rerank=64, cache_folder=tmp_path)
    second = build_index(clustered_store, "torch", project_dim=8, rerank=64, precision="float16",
                         cache_folder=tmp_path)
    assert fits == ["fit"] and torch.equal(first.projection.basis, second.projection.basis)
    assert build_index(clustered_store, "torch", project_dim=8, cache=False).projection is not None
    assert fits == ["fit", "fit"]  # cache=False builds


def test_a_damaged_projection_is_rebuilt(clustered_store, tmp_path, monkeypatch, caplog):
    fits = _count_calls(monkeypatch, two_stage_module.Projection, "fit")
    build_index(clustered_store, "ivf", nlist=16, project_dim=8, cache_folder=tmp_path)
    entry = CacheEntry(next(tmp_path.glob("*.json")).with_suffix(""))
    entry.projection_path.write_bytes(entry.projection_path.read_bytes()[:-4] + b"oops")
    with caplog.at_level("WARNING"):
        build_index(clustered_store, "ivf", nlist=16, project_dim=8, cache_folder=tmp_path)
    assert "does not match" in caplog.text and fits == ["fit", "fit"]
