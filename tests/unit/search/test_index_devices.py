"""A bare "cuda" is this process's current CUDA device: for faiss-gpu indexes and for the resident-rows cache.

The trainer sets each rank's device (``torch.cuda.set_device``); "cuda" then has to mean that device, not GPU 0.
No GPU here: ``torch.cuda`` is patched to report two devices with the second current, faiss to take GPU copies.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import knn_cm.data.store as store_module
import knn_cm.search.build as build_module
import knn_cm.search.faiss_index as faiss_index_module
from knn_cm.data import DataStore
from knn_cm.device import as_device
from knn_cm.search import build_index

CURRENT = 1


@pytest.fixture
def second_gpu_current(monkeypatch):
    """torch.cuda as a rank whose device (set by the trainer) is GPU 1 of 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: CURRENT)


def test_a_bare_cuda_is_the_current_device(second_gpu_current):
    from knn_cm.device import concrete_device

    assert concrete_device("cuda") == torch.device("cuda", CURRENT)
    assert concrete_device("cuda:0") == torch.device("cuda", 0)
    assert concrete_device("cpu") == torch.device("cpu")
    assert as_device("cuda") == as_device("auto") == torch.device("cuda", CURRENT)


def test_cuda_and_cuda_n_are_one_entry_of_the_resident_rows(second_gpu_current, monkeypatch):
    """"cuda" and "cuda:1" were two keys, so one rank could hold the store's rows twice on its GPU."""
    made = []

    def from_store(store, device, dtype, storage):
        made.append(device)
        return types.SimpleNamespace(device=device)

    monkeypatch.setattr(store_module.ResidentRows, "from_store", staticmethod(from_store))
    store = DataStore.from_array(np.zeros((4, 1, 2, 2), dtype=np.uint8), name="devices")
    bare = store.resident("cuda", torch.float32, "uint8")
    numbered = store.resident(f"cuda:{CURRENT}", torch.float32, "uint8")
    assert bare is numbered and made == [torch.device("cuda", CURRENT)]


def _gpu_faiss(copies: list):
    """The installed faiss with GPU support faked: a "GPU copy" wraps the CPU index and records its device number."""
    import faiss

    def index_cpu_to_gpu(resources, device, index):
        copies.append(device)
        return types.SimpleNamespace(ntotal=index.ntotal, d=index.d, cpu_index=index)

    return types.SimpleNamespace(**{name: getattr(faiss, name) for name in dir(faiss) if not name.startswith("__")},
                                 StandardGpuResources=lambda: object(), index_cpu_to_gpu=index_cpu_to_gpu)


def test_a_faiss_gpu_index_on_cuda_goes_to_the_ranks_own_gpu(second_gpu_current, monkeypatch):
    """``index.device=cuda`` put every rank's faiss index on GPU 0 (``device.index or 0``)."""
    copies = []
    fake = _gpu_faiss(copies)
    monkeypatch.setattr(faiss_index_module, "faiss_module", lambda: fake)
    monkeypatch.setattr(build_module, "faiss_module", lambda: fake)
    store = DataStore.from_array(np.random.default_rng(0).integers(0, 256, (32, 1, 2, 2), dtype=np.uint8),
                                 name="devices")
    index = build_index(store, "flat", device="cuda", cache=False)
    assert copies == [CURRENT]
    assert index.device == torch.device("cuda", CURRENT)
