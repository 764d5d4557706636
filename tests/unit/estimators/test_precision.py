"""Estimators and the torch index compute in IEEE float32 whatever matmul precision the caller set
(TF32 "high", bf16 "medium", ``allow_tf32``), and give the caller's settings back, also on exceptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import knn_cm.estimators.distances as distances
import knn_cm.search.torch_index as torch_index
from knn_cm.data import DataStore
from knn_cm.estimators import make_estimator
from knn_cm.numerics import _matmul_precision_settings
from knn_cm.search import build_index

ESTIMATORS = {"exact": {}, "mc": {"n": 8}, "uniform": {"n": 8}, "stf": {"n": 8},
              "stf_shared": {"n": 16, "variant": "shared"}, "knn": {"k": 32, "n": 8}}
NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _settings() -> tuple:
    """Everything a caller can set about float32 products: legacy precision and per-backend values."""
    legacy, backends = _matmul_precision_settings()
    return legacy, tuple(backends.values())


@pytest.fixture(autouse=True)
def caller_settings():
    """Each test's own settings are undone afterwards, whatever it set (the suite shares the process)."""
    legacy, backends = _matmul_precision_settings()
    yield
    torch.set_float32_matmul_precision(legacy or "highest")
    for backend, value in backends.items():
        backend.fp32_precision = value


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(0).integers(0, 256, (300, 3, 16, 16), dtype=np.uint8)
    store = DataStore.from_array(images, name="precision")
    index = build_index(store, "torch")
    generator = torch.Generator().manual_seed(0)
    x = store.float(torch.randperm(len(store), generator=generator)[:6])
    z = x + 0.5 * torch.randn(x.shape, generator=generator)
    return store, index, x, z


def _estimator(name, store, index, **kwargs):
    options = dict(ESTIMATORS[name]) | kwargs
    base = name.split("_")[0]
    if base == "knn":
        options["index"] = index
    return make_estimator(base, store, **options)


def _outputs(store, index, x, z):
    out = {}
    for name in ESTIMATORS:
        for sync_free in (False, True):
            estimator = _estimator(name, store, index, sync_free=sync_free)
            out[name, sync_free] = estimator(z, 0.5, x=x, generator=torch.Generator().manual_seed(1))
    out["torch_index"] = index.search(z, 32)
    return out


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_estimates_are_bit_identical_under_reduced_matmul_precision(data, precision):
    """On a CPU with bf16 units (avx512_bf16, AMX), "medium" itself changes float32 products; on others the
    probe below is what fails on code without the isolation."""
    store, index, x, z = data
    reference = _outputs(store, index, x, z)
    torch.set_float32_matmul_precision(precision)
    reduced = _outputs(store, index, x, z)
    assert torch.get_float32_matmul_precision() == precision
    for key, value in reference.items():
        if key == "torch_index":
            assert all(torch.equal(a, b) for a, b in zip(value, reduced[key])), key
        else:
            assert torch.equal(value, reduced[key]), key


def _probe(monkeypatch, fail: bool = False) -> list:
    """Wrap the GEMM distance functions: record the settings seen inside (and raise when ``fail``)."""
    seen = []

    def wrap(module, name):
        original = getattr(module, name)

        def probed(*args, **kwargs):
            seen.append(_settings())
            if fail:
                raise RuntimeError("injected failure inside the estimator")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, probed)

    wrap(distances, "gemm_sq_dists")  # exact, mc, uniform, stf
    wrap(torch_index, "rows_in")  # the torch index's products (knn)
    return seen


def _ieee() -> tuple:
    """The settings an estimator must see inside: what "highest" alone gives."""
    torch.set_float32_matmul_precision("highest")
    return _settings()


def test_the_estimator_sees_highest_precision_when_the_caller_set_high(data, monkeypatch):
    store, index, x, z = data
    inside = _ieee()
    seen = _probe(monkeypatch)
    torch.set_float32_matmul_precision("high")
    assert torch.backends.cuda.matmul.allow_tf32  # the same setting under its other name
    for name in ESTIMATORS:
        for sync_free in (False, True):
            seen.clear()
            _estimator(name, store, index, sync_free=sync_free)(z, 0.5, x=x, generator=torch.Generator().manual_seed(1))
            assert seen and all(settings == inside for settings in seen), (name, sync_free, seen)
    seen.clear()
    index.search(z, 8)  # the index on its own, outside any estimator
    assert seen and all(settings == inside for settings in seen), seen
    assert torch.get_float32_matmul_precision() == "high"


def _caller_states():
    """Caller settings to give back: the legacy levels, allow_tf32, and the per-backend API of torch >= 2.9."""
    states = [("legacy high", lambda: torch.set_float32_matmul_precision("high")),
              ("legacy medium", lambda: torch.set_float32_matmul_precision("medium")),
              ("allow_tf32", lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True)),
              ("untouched", lambda: None)]
    if NEW_API:
        def per_backend():
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        states.append(("per-backend tf32 / bf16", per_backend))
    return states


@pytest.mark.parametrize("state", _caller_states(), ids=lambda state: state[0])
@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_the_callers_settings_come_back_exactly(data, monkeypatch, state, fail):
    store, index, x, z = data
    _, set_state = state
    set_state()
    before = _settings()
    seen = _probe(monkeypatch, fail=fail)
    for name in ("exact", "stf", "knn"):
        estimator = _estimator(name, store, index)
        if fail:
            with pytest.raises(RuntimeError, match="injected failure"):
                estimator(z, 0.5, x=x)
        else:
            estimator(z, 0.5, x=x)
        assert seen, name
        assert _settings() == before, (name, _settings(), before)
