"""x-flip stays virtual in every storage: resident rows hold the N stored images, never 2N, and every
estimator, index and gather reads exactly what rows holding the mirrored copies would give (bit for bit).

The CUDA path is the one run here: ``storage="uint8"`` (the CUDA default), ``sync_free=True`` and
fixed-shape gathers, on CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.data.pixels import uint8_to_float
from knn_cm.data.resident import ResidentRows
from knn_cm.estimators import make_estimator
from knn_cm.search import build_index

ESTIMATORS = {"exact": {}, "mc": {"n": 8}, "uniform": {"n": 8}, "stf": {"n": 8},
              "stf_shared": {"n": 16, "variant": "shared"}, "knn": {"k": 32, "n": 8},
              "knn_refined": {"k": 32, "n": 8, "refine_proposal": True}}
STORAGES = ["uint8", "float", "float16", "mapped"]
BASE = 300  # stored images; with x-flip the store has 600 elements
CHUNK = 128  # torch index rows per step: a chunk straddles the stored / mirrored boundary at 300


def _materialised(store: DataStore, storage: str, dtype=torch.float32) -> ResidentRows:
    """Rows holding all 2N elements, the mirrored ones copied in (how x-flip used to be made resident)."""
    every = store.uint8().reshape(len(store), -1)
    if storage == "float":
        every = uint8_to_float(every, dtype)
    elif storage == "float16":
        every = uint8_to_float(every, dtype).to(torch.float16)
    return ResidentRows(every, dtype, store.fingerprint)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (BASE, 3, 8, 8), dtype=np.uint8)


def _stores(images, storage):
    """(virtual, materialised): two x-flip stores of the same images, the second holding 2N rows."""
    virtual = DataStore.from_array(images, name="virtual", xflip=True)
    materialised = DataStore.from_array(images, name="materialised", xflip=True)
    key = ("cpu", torch.float32, "uint8" if storage == "mapped" else storage)
    materialised._resident[key] = _materialised(materialised, key[2])
    return virtual, materialised, key[2]


@pytest.mark.parametrize("storage", STORAGES)
def test_resident_rows_hold_the_stored_images_only(images, storage):
    store = DataStore.from_array(images, xflip=True)
    rows = store.resident("cpu", torch.float32, storage)
    element_size = {"uint8": 1, "mapped": 1, "float16": 2, "float": 4}[storage]
    assert len(store) == 2 * BASE and rows.size == 2 * BASE
    assert rows.rows.shape[0] == BASE and rows.storage_bytes == BASE * store.dim * element_size


@pytest.mark.parametrize("fixed_shapes", [True, False, None])
@pytest.mark.parametrize("storage", ["uint8", "float", "float16"])
def test_gathers_and_chunks_equal_materialised_rows(images, storage, fixed_shapes):
    virtual, materialised, storage = _stores(images, storage)
    rows = virtual.resident("cpu", torch.float32, storage)
    reference = materialised.resident("cpu", torch.float32, storage)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 2 * BASE, 500))
    assert torch.equal(rows.gather(ids, fixed_shapes=fixed_shapes), reference.gather(ids))
    out = torch.empty(500, rows.dim)
    assert rows.gather(ids, out=out, fixed_shapes=fixed_shapes).data_ptr() == out.data_ptr()
    assert torch.equal(out, reference.gather(ids))
    assert torch.equal(rows.sq_norms, reference.sq_norms) and rows.max_sq_norm == reference.max_sq_norm
    for chunk_rows in (CHUNK, 7, 2 * BASE):
        chunks, expected = list(rows.chunks(chunk_rows)), list(reference.chunks(chunk_rows))
        assert [start for start, _ in chunks] == [start for start, _ in expected]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(chunks, expected))


@pytest.mark.parametrize("storage", STORAGES)
def test_estimators_and_index_equal_materialised_xflip_bit_for_bit(images, storage):
    virtual, materialised, resident_storage = _stores(images, storage)
    generator = torch.Generator().manual_seed(0)
    x = virtual.float(torch.randint(0, 2 * BASE, (6,), generator=generator))
    outputs = {}
    for store in (virtual, materialised):
        # "mapped" is the virtual store's own array; its materialised reference holds 2N uint8 rows.
        store_storage = storage if store is virtual else resident_storage
        index = build_index(store, "torch", storage=store_storage, chunk_rows=CHUNK)
        for sigma in (0.002, 5.0):
            z = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            outputs[store.name, "search", sigma] = index.search(z, 40)
            for name, options in ESTIMATORS.items():
                options = dict(options) | ({"index": index} if name.startswith("knn") else {})
                for sync_free in (True, False):
                    estimator = make_estimator(name.split("_")[0], store, storage=store_storage,
                                               sync_free=sync_free, **options)
                    outputs[store.name, name, sync_free, sigma] = estimator(
                        z, sigma, x=x, generator=torch.Generator().manual_seed(2))
    assert virtual.resident("cpu", torch.float32, storage).rows.shape[0] == BASE
    assert materialised.resident("cpu", torch.float32, resident_storage).rows.shape[0] == 2 * BASE
    for key, value in outputs.items():
        if key[0] != "virtual":
            continue
        expected = outputs[("materialised",) + key[1:]]
        if key[1] == "search":
            assert torch.equal(value[0], expected[0]) and torch.equal(value[1], expected[1]), key
        else:
            assert torch.equal(value, expected), key
