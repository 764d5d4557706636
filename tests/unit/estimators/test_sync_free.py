"""The host-synchronisation-free estimator path (the CUDA default) run on CPU tensors, memory-mapped data,
autocast isolation, and CUDA-only checks under ``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.estimators import make_estimator
from knn_cm.search import build_index

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run `make device-check` on a GPU machine)")
ESTIMATOR_KWARGS = {
    "exact": {}, "mc": {"n": 8}, "uniform": {"n": 8}, "stf": {"n": 8},
    "stf_shared": {"n": 16, "variant": "shared"}, "knn": {"k": 32, "n": 8}, "knn_k_ge_n": {"k": 10_000, "n": 8},
    "knn_n1": {"k": 32, "n": 1}, "single": {},
}


def _make(name, store, index, **kwargs):
    options = dict(ESTIMATOR_KWARGS[name]) | kwargs
    base = name.split("_")[0] if name.startswith(("knn", "stf")) else name
    if base == "knn":
        options["index"] = index
    return make_estimator(base, store, **options)


@pytest.fixture(scope="module")
def cifar_like():
    images = np.random.default_rng(0).integers(0, 256, (400, 3, 32, 32), dtype=np.uint8)
    store = DataStore.from_array(images, name="sync_free")
    return store, build_index(store, "torch")


def _batch(store, sigma, count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = store.float(torch.randperm(len(store), generator=generator)[:count])
    z = x + sigma * torch.randn(x.shape, generator=generator)
    z[0] = x[0]  # exactly on a data point
    return x, z


@pytest.mark.parametrize("sigma", [0.002, 0.3, 5.0, 80.0])
@pytest.mark.parametrize("name", list(ESTIMATOR_KWARGS))
def test_sync_free_path_gives_the_default_paths_estimates(cifar_like, name, sigma):
    """Same draws (same generator), same estimate up to float rounding: small sigma exercises the
    refinement, large sigma the GEMM distances of the default path."""
    store, index = cifar_like
    x, z = _batch(store, sigma)
    default = _make(name, store, index, sync_free=False)(z, sigma, x=x, generator=torch.Generator().manual_seed(1))
    fixed = _make(name, store, index, sync_free=True)(z, sigma, x=x, generator=torch.Generator().manual_seed(1))
    # Large sigma: the default path's GEMM distances may move a weight by up to TOLERANCE_EPS eps nats
    # (0.012 in float32; estimators/distances.py), the fixed path's direct differences are exact.
    atol = 2e-5 if sigma < 1 else 2e-3
    assert torch.allclose(fixed, default, rtol=0, atol=atol), (name, (fixed - default).abs().max().item())


def test_sync_free_is_the_cuda_default():
    assert make_estimator("uniform", DataStore.from_array(np.zeros((4, 1, 2, 2), np.uint8))).sync_free is False


@pytest.mark.parametrize("xflip", [False, True])
def test_every_estimator_is_the_same_on_mapped_and_in_memory_data(tmp_path, xflip):
    images = np.random.default_rng(1).integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    mapped = DataStore.from_array(np.load(tmp_path / "images.npy", mmap_mode="r"), xflip=xflip)
    memory = DataStore.from_array(images, xflip=xflip)
    assert isinstance(mapped.images, np.memmap) and mapped.fingerprint == memory.fingerprint
    x, z = _batch(memory, 0.7)
    for name in ESTIMATOR_KWARGS:
        for sync_free in (False, True):
            outputs = []
            for store, storage in ((mapped, "mapped"), (memory, "float")):
                index = build_index(store, "torch", storage=storage)
                estimator = _make(name, store, index, storage=storage, sync_free=sync_free)
                outputs.append(estimator(z, 0.7, x=x, generator=torch.Generator().manual_seed(2)))
            assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-6), (name, sync_free)


def test_autocast_does_not_leak_into_the_estimator(cifar_like):
    store, index = cifar_like
    x, z = _batch(store, 1.0)
    for name in ("exact", "knn", "stf"):
        estimator = _make(name, store, index)
        outside = estimator(z, 1.0, x=x, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = estimator(z, 1.0, x=x, generator=torch.Generator().manual_seed(0))
        assert inside.dtype == torch.float32 and torch.equal(inside, outside), name


# ------------------------------------------------------------------------------------- CUDA only
@contextlib.contextmanager
def sync_errors():
    """Every host synchronisation inside raises (set_sync_debug_mode "error")."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@needs_cuda
@pytest.mark.parametrize("storage", ["uint8", "float16"])
def test_cuda_estimators_never_synchronise_and_match_the_cpu(cifar_like, storage):
    store, cpu_index = cifar_like
    cuda_index = build_index(store, "torch", device="cuda", storage=storage)
    for sigma in (0.002, 0.5, 5.0, 80.0):
        x, z = _batch(store, sigma)
        reference = make_estimator("exact", store)(z, sigma)
        xc, zc = x.cuda(), z.cuda()
        sigma_c = torch.full((len(z),), sigma, device="cuda")
        for name in ESTIMATOR_KWARGS:
            estimator = _make(name, store, cuda_index, device="cuda", storage=storage)
            assert estimator.sync_free
            generator = torch.Generator(device="cuda").manual_seed(0)
            with sync_errors():
                out = estimator(zc, sigma_c, x=xc, generator=generator)
                out_scalar_sigma = estimator(zc, sigma, x=xc, generator=generator)
            assert out.is_cuda and bool(torch.isfinite(out).all()) and out_scalar_sigma.shape == out.shape
            cpu = _make(name, store, cpu_index)(z, sigma, x=x, generator=torch.Generator().manual_seed(0))
            cuda_error = (out.cpu() - reference).square().mean().item()
            cpu_error = (cpu - reference).square().mean().item()
            tolerance = 1e-5 if storage == "uint8" else 1e-4  # float16 rows: values off by <= 2.4e-4
            if name == "exact":
                assert torch.allclose(out.cpu(), reference, atol=tolerance * 10), name
            else:  # other draws than the CPU's: compare errors, which have the same distribution
                assert cuda_error <= 3 * cpu_error + tolerance + 0.05 * reference.square().mean().item(), (name, sigma)


@needs_cuda
def test_cuda_torch_index_equals_the_cpu_torch_index(cifar_like):
    store, cpu_index = cifar_like
    _, z = _batch(store, 2.0, count=16)
    # Building the index copies the rows to the GPU and reads their largest norm: both synchronise by
    # design, so they (and the queries' copy) happen before the checked region; the search may not.
    cuda_index = build_index(store, "torch", device="cuda")
    queries = z.cuda().reshape(16, -1)
    with sync_errors():
        cuda_d, cuda_i = cuda_index.search(queries, 50)
    cpu_d, cpu_i = cpu_index.search(z.reshape(16, -1), 50)
    assert (cuda_i.cpu() == cpu_i).float().mean() >= 0.99
    assert torch.allclose(cuda_d.cpu(), cpu_d, rtol=1e-4, atol=0.05)


@needs_cuda
def test_cuda_flat_without_faiss_gpu_is_the_torch_index(cifar_like):
    import faiss

    store, _ = cifar_like
    index = build_index(store, "flat", device="cuda")
    assert index.kind == ("flat" if hasattr(faiss, "StandardGpuResources") else "torch")


@needs_cuda
def test_two_cuda_training_steps_with_a_sync_free_knn_estimator(tmp_path):
    """iCT + KNN (Heun) training steps on CUDA: every estimator call runs under sync-debug "error"
    (the trainer's own logging may synchronise; the estimator may not), inside fp16 autocast.

    The trainer runs on the estimator's device (its context says so): a trainer on the CPU would hand the
    estimator CPU batches, whose copies to the GPU inside the checked call synchronise by construction."""
    from knn_cm.models import CMPrecond, SongUNet
    from knn_cm.training import DistributedContext, ICTObjective, Trainer, TrainerConfig

    images = np.random.default_rng(0).integers(0, 256, (512, 3, 8, 8), dtype=np.uint8)
    store = DataStore.from_array(images, name="train_cuda", xflip=True)

    class Guarded:  # wraps an estimator so each call is checked (on CUDA) and counted
        # Private names, so the wrapper hides none of the estimator's attributes (its device among them);
        # the class default keeps __getattr__ on a half-built copy from recursing.
        _wrapped = None

        def __init__(self, estimator, device):
            self._wrapped, self._device, self.calls = estimator, device, []

        def __getattr__(self, name):
            return getattr(self._wrapped, name)

        def __call__(self, *args, **kwargs):
            self.calls.append(1)
            guard = sync_errors() if self._device == "cuda" else contextlib.nullcontext()
            with guard:
                return self._wrapped(*args, **kwargs)

    losses = {}
    for device in ("cpu", "cuda"):
        index = build_index(store, "torch", device=device)
        guarded = Guarded(make_estimator("knn", store, index=index, k=64, n=16, device=device), device)
        torch.manual_seed(0)
        network = CMPrecond(SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16,
                                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
        objective = ICTObjective(guarded, total_steps=100, solver="heun")
        config = TrainerConfig(max_steps=100, batch_size=8, progress=False, resume="never", device=device,
                               precision="fp16" if device == "cuda" else "fp32")
        trainer = Trainer(config, tmp_path / device, store, network, objective,
                          lambda params: torch.optim.RAdam(params, lr=1e-4),
                          context=DistributedContext(device=torch.device(device)), estimator_device=device)
        assert trainer.device.type == device
        records = [trainer.train_step() for _ in range(2)]
        assert len(guarded.calls) >= 2, "the Heun step calls the estimator"
        losses[device] = [float(record["loss"]) for record in records]
    assert all(np.isfinite(losses["cuda"]))
    # Other noise draws on the GPU: the same order of magnitude of loss, not the same value.
    assert 0.2 < losses["cuda"][0] / losses["cpu"][0] < 5, losses
