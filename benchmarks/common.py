"""Benchmark helpers: timing, the matmul peak (a measured ceiling), machine facts, peak memory, CIFAR-10-like data."""

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


def timed_call(estimator, z, sigma, seed: int):
    """(estimate, seconds) of one estimator call with a generator seeded ``seed``."""
    start = time.perf_counter()
    value = estimator(z, sigma, generator=torch.Generator().manual_seed(seed))
    return value, time.perf_counter() - start


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


class MatmulPeak:
    """The float32 GEMM ceiling that "fraction of peak" divides by: the best rate this process reaches.

    A peak that measured code exceeds is no ceiling (an earlier version timed six shapes once, best of 3,
    before the estimators ran; on a machine shared with other work `exact` then ran faster than that).
    So the ceiling here is the best float32 GEMM rate this process achieves on this machine for shapes at
    least as favourable as the measured code's:

    - **Shapes** (``shapes``, each ``(M, K, N, layout)``): the measured code's own products, in their
      operand layouts (for ``exact``: z [B, d] times rows.T, ``layout "b.T"``, and weights [B, N] times
      rows [N, d], ``layout "b"``), plus large square ones, which a BLAS runs at least as well.
    - **When**: the probes (``functions()``) join the measured code's round-robin
      (``interleaved_seconds``), as many calls as each method, at every t; each probe's rate is its best
      over every round (``record``). Load from other processes and the clock's state hit probes and
      methods alike, and a probe gets as many chances at a quiet moment as the code it bounds.
    - **By construction**: a rate that measured GEMM code reached (``observe``: ``exact``'s 4 B N d flops
      of float32 GEMM over its whole call, softmax and refinement included) is a rate this process
      achieved, so the ceiling is at least that too. A fraction of this peak cannot exceed 1;
      ``set_by`` names the entry that set it: a probe, normally; the observed code itself only if every
      probe was slower (its fraction then reads 1.0, and ``set_by`` shows the probes were unlucky).

    ``result()``: {"gflops": the ceiling, "set_by": name, "per_shape": {name: best GFLOP/s},
    "observed": {name: best GFLOP/s}, "rounds": calls recorded per probe}.
    """

    def __init__(self, shapes, device="cpu", dtype=torch.float32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        stored = {}  # one random matrix per operand and shape: exact's two products share their [N, d] rows

        def matrix(operand: str, rows: int, cols: int) -> torch.Tensor:
            if (operand, rows, cols) not in stored:
                stored[operand, rows, cols] = torch.randn(rows, cols, generator=generator, dtype=dtype).to(device)
            return stored[operand, rows, cols]

        self._probes = {}
        for m, k, n, layout in shapes:
            a = matrix("a", m, k)
            if layout == "b.T":  # b stored [N, K] row-major, as the data rows are in z @ rows.T
                b = matrix("b", n, k).T
            elif layout == "b":  # b stored [K, N] row-major, as in weights @ rows
                b = matrix("b", k, n)
            else:
                raise ValueError(f"matmul peak shape layout: {layout!r}; allowed: 'b.T', 'b'")
            out = torch.empty(m, n, dtype=dtype, device=device)
            name = f"gemm_{m}x{k}x{n}_{layout.replace('.', '')}"
            self._probes[name] = (lambda a=a, b=b, out=out: torch.mm(a, b, out=out), 2.0 * m * k * n)
        self.per_shape = dict.fromkeys(self._probes, 0.0)
        self.observed = {}
        self.rounds = 0

    def functions(self) -> dict:
        """{probe name: callable} to time alongside the measured code."""
        return {name: function for name, (function, _) in self._probes.items()}

    def record(self, seconds: dict, calls: int) -> None:
        """Take the probes' best times of one round-robin (other names in ``seconds`` are ignored)."""
        for name, (_, flops) in self._probes.items():
            if name in seconds:
                self.per_shape[name] = max(self.per_shape[name], flops / seconds[name] / 1e9)
        self.rounds += calls

    def observe(self, name: str, gflops: float) -> None:
        """A float32 GEMM rate that measured code reached; the ceiling is at least it."""
        self.observed[name] = max(self.observed.get(name, 0.0), gflops)

    def result(self) -> dict:
        candidates = self.per_shape | self.observed
        set_by = max(candidates, key=candidates.get)
        return {"gflops": candidates[set_by], "set_by": set_by, "per_shape": dict(self.per_shape),
                "observed": dict(self.observed), "rounds": self.rounds}


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


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo), or platform.processor() where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(threads: int) -> dict:
    info = {"platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "loadavg_start": os.getloadavg()}
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
