"""The faiss backend: flat, IVF and scalar-quantised indexes (CPU, or GPU with faiss-gpu)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from knn_cm.device import as_device, concrete_device
from knn_cm.search.spec import IndexSpec, check_index_data, check_search_input

_ADD_CHUNK = 16384


def faiss_module():
    """faiss, imported on first use (it is not needed by the torch backend)."""
    import faiss

    return faiss


class FaissIndex:
    """A built faiss index tied to the data it was built from.

    Attributes:
        spec: the resolved :class:`IndexSpec`.
        data_fingerprint: :attr:`DataStore.fingerprint` of the indexed data.
        size: number of indexed elements N; ``dim``: vector dimension d.
        device: where searches run ("cpu" or a CUDA device).
    """

    def __init__(self, faiss_index, spec: IndexSpec, data_fingerprint: str, device: torch.device):
        self.faiss_index = faiss_index
        self.spec = spec
        self.data_fingerprint = data_fingerprint
        self.device = torch.device(device)
        self.size = int(faiss_index.ntotal)
        self.dim = int(faiss_index.d)
        if spec.nprobe is not None:
            self.nprobe = spec.nprobe

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def nprobe(self) -> int | None:
        return self.spec.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not self.kind.startswith("ivf"):
            raise ValueError(f"nprobe applies to IVF kinds (ivf, ivf_sq8), not to {self.kind!r}")
        if not isinstance(value, (int, np.integer)) or not 1 <= value <= self.spec.nlist:
            raise ValueError(f"nprobe must be an integer in [1, nlist={self.spec.nlist}], got {value!r}")
        self.spec = dataclasses.replace(self.spec, nprobe=int(value))
        faiss = faiss_module()
        if self.device.type == "cuda":
            faiss.GpuParameterSpace().set_index_parameter(self.faiss_index, "nprobe", int(value))
        else:
            faiss.extract_index_ivf(self.faiss_index).nprobe = int(value)

    def __repr__(self) -> str:
        return f"FaissIndex({self.spec}, N={self.size}, d={self.dim}, device={self.device})"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest elements of each query.

        Args:
            queries: [B, d] (or [B, C, H, W], flattened) in data scale.
            k: neighbours per query; clamped to N.

        Returns:
            (sq_dists float32 [B, k'], indices int64 [B, k']) on the queries' device, nearest first,
            with k' = min(k, N). Approximate kinds may find fewer than k' elements for a query:
            the missing entries hold distance +inf and index -1.
        """
        queries, k = check_search_input(queries, k, self.dim, self.size)
        return self._faiss_search(queries, k)

    def result_device(self, queries: torch.Tensor) -> torch.device:
        """Results come back on the queries' device."""
        return queries.device

    def _faiss_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_device = queries.device
        if self.device.type == "cuda":
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take CUDA tensors directly)

            sq_dists, indices = self.faiss_index.search(
                queries.detach().to(self.device, torch.float32).contiguous(), k)
        else:
            array = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
            sq_dists, indices = self.faiss_index.search(array, k)
            sq_dists, indices = torch.from_numpy(sq_dists), torch.from_numpy(indices)
        sq_dists = sq_dists.to(out_device)
        indices = indices.to(out_device)
        # faiss marks missing results with index -1 and a huge distance: make the distance +inf.
        sq_dists = sq_dists.masked_fill(indices < 0, math.inf)
        return sq_dists, indices

    def check_data(self, store) -> None:
        """Raise ValueError unless this index was built from exactly ``store``'s elements."""
        check_index_data(self, store)


def check_faiss_device(device) -> torch.device:
    device = as_device(device, "index device")
    if device.type == "cuda" and not hasattr(faiss_module(), "StandardGpuResources"):
        raise ValueError(f"index device {device} requested but the installed faiss has no GPU support; "
                         f"install faiss-gpu (pip install 'knn-cm[gpu]') or use device='cpu'")
    return device


def build_faiss_cpu(store, spec: IndexSpec, device: torch.device, vectors: torch.Tensor | None = None):
    """The faiss index over the store's rows, or over ``vectors`` [N, m] (projected rows) when given."""
    faiss = faiss_module()
    if vectors is not None:
        from knn_cm.data.resident import ResidentRows

        rows = ResidentRows(vectors, torch.float32, store.fingerprint)
    else:
        rows = store.resident("cpu", torch.float32)
    dim = rows.dim
    if spec.kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif spec.kind == "sq8":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
    else:
        quantizer = faiss.IndexFlatL2(dim)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_L2)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, spec.nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_L2)
        index.cp.seed = spec.seed
    if not index.is_trained:
        generator = np.random.default_rng(spec.seed)
        sample = np.sort(generator.choice(rows.size, size=spec.train_size, replace=False))
        training = np.ascontiguousarray(rows.gather(torch.from_numpy(sample)).numpy())
        trainer = faiss_to_device(index, device) if device.type == "cuda" else index
        trainer.train(training)
        if trainer is not index:
            index = faiss.index_gpu_to_cpu(trainer)
    for start in range(0, rows.size, _ADD_CHUNK):
        index.add(rows.numpy_float32(start, min(start + _ADD_CHUNK, rows.size)))
    return index


def faiss_to_device(cpu_index, device: torch.device):
    if device.type == "cpu":
        return cpu_index
    faiss = faiss_module()
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, concrete_device(device).index, cpu_index)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index
    return gpu_index
