"""Shared benchmark helpers: timing, the matmul peak, machine facts, peak memory, CIFAR-10-like data."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch


def synchronize(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(function, repeats: int, device="cpu") -> float:
    """Best of ``repeats`` timed calls after one warm-up (best-of: other engineers' load only adds time)."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_seconds(functions: dict, repeats: int, device="cpu") -> dict:
    """Best time of each function, timed round-robin so load changes hit all of them alike."""
    for function in functions.values():
        function()
    synchronize(device)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def matmul_peak(device="cpu", shapes=None, repeats: int = 3, dtype=torch.float32) -> dict:
    """Best float32 GEMM rate over several shapes, the estimator's own among them.

    Returns {"gflops": best, "per_shape": {"MxKxN": gflops}}: "fraction of peak" elsewhere divides by
    the best of these, so it cannot exceed 1 because one shape suits the BLAS better than another.
    """
    shapes = shapes or [(4096, 4096, 4096), (2048, 2048, 2048), (128, 3072, 16384), (128, 3072, 65536),
                        (128, 65536, 3072), (1024, 3072, 8192)]
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(n, k, device=device, dtype=dtype).T  # rows-major data, as the estimators use it
        seconds = best_seconds(lambda a=a, b=b: a @ b, repeats, device)
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
    return {"gflops": max(per_shape.values()), "per_shape": per_shape}


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB: VmHWM of /proc/self/status where it exists (ru_maxrss
    would carry the parent's peak into a subprocess across fork and exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def machine(threads: int) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "loadavg_start": os.getloadavg()}
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpu"] = hasattr(faiss, "StandardGpuResources")
    except ImportError:
        info["faiss"] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def cifar_like_images(count: int, reference: np.ndarray, seed: int = 0, components: int = 256,
                      clusters: int = 1000, chunk: int = 16384):
    """``count`` uint8 images [count, 3, 32, 32] with the cluster structure of ``reference`` (real CIFAR-10).

    A Gaussian mixture fitted to the reference: k-means (``clusters`` cells, faiss) on its top
    ``components`` principal components; an image is a cell's centre plus Gaussian noise with that cell's
    per-component spread, plus isotropic residual noise with the variance the components leave out,
    then rounded to uint8. So the data has the reference's spectrum and its clusters, without copies of
    its images (no near-duplicates of the reference beyond what the mixture implies).
    """
    import faiss

    generator = np.random.default_rng(seed)
    ref = reference.reshape(len(reference), -1).astype(np.float32)
    mean = ref.mean(0)
    centred = ref - mean
    sample = centred[generator.choice(len(ref), size=min(len(ref), 20000), replace=False)]
    _, singular, vt = np.linalg.svd(sample, full_matrices=False)
    basis = vt[:components].T.astype(np.float32)  # [d, m]
    total_var = (sample**2).sum(1).mean()
    coords = centred @ basis
    residual_var = max(total_var - (coords**2).sum(1).mean(), 0.0) / (ref.shape[1] - components)
    kmeans = faiss.Kmeans(components, clusters, niter=20, seed=seed, verbose=False)
    kmeans.train(np.ascontiguousarray(coords))
    _, assign = kmeans.index.search(np.ascontiguousarray(coords), 1)
    assign = assign[:, 0]
    weights = np.bincount(assign, minlength=clusters).astype(np.float64)
    spread = np.stack([coords[assign == c].std(0) if (assign == c).sum() > 1 else coords.std(0)
                       for c in range(clusters)]).astype(np.float32)
    centres = kmeans.centroids.astype(np.float32)
    images = np.empty((count, ref.shape[1]), dtype=np.uint8)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        cell = generator.choice(clusters, size=size, p=weights / weights.sum())
        z = centres[cell] + spread[cell] * generator.standard_normal((size, components), dtype=np.float32)
        values = mean + z @ basis.T + np.sqrt(residual_var) * generator.standard_normal((size, ref.shape[1]),
                                                                                         dtype=np.float32)
        images[start : start + size] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return images.reshape(count, 3, 32, 32)
