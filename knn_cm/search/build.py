"""Nearest-neighbour indexes over a DataStore: specs, building, searching, and an on-disk cache.

Kinds (Appendix D.5 of the paper): ``flat`` exact L2; ``ivf`` inverted file with ``nlist`` cells
searched over ``nprobe`` of them; ``sq8`` 8-bit scalar quantiser (4x less memory); ``ivf_sq8`` both
(all faiss); ``torch`` exact L2 by chunked matrix products in torch on any device, no faiss
(:mod:`knn_cm.search.torch_index`; search ``precision`` float32, float16 or bfloat16). Any kind can search a
PCA-reduced space instead (``project_dim``, with an exact ``rerank`` of the best candidates): an
approximate proposal for large N. On CUDA, ``flat`` uses faiss-gpu when it is installed and the torch
index otherwise. Searches return squared L2 distances and element indices, sorted nearest first.

Trained indexes (ivf, sq8, ivf_sq8) and the projections of projected searches (with their faiss index) are
cached on disk keyed by the data fingerprint and the build spec, written atomically and verified on load
(fingerprint, spec, size, file digests); a cache entry that does not match is rebuilt, never used. An entry is
built under a file lock: of the processes that want it at once (the ranks of a node, jobs sharing the cache)
the first builds it and the others wait on the lock and then load it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from knn_cm.data.resident import ResidentRows
from knn_cm.device import as_device
from knn_cm.io import cache_dir
from knn_cm.search.cache import PROJECTION_SAMPLE, CacheEntry
from knn_cm.search.faiss_index import FaissIndex, build_faiss_cpu, check_faiss_device, faiss_module, faiss_to_device
from knn_cm.search.spec import IndexSpec
from knn_cm.search.torch_index import TorchIndex
from knn_cm.search.two_stage import Projection, TwoStageIndex

log = logging.getLogger(__name__)


def build_index(store, kind: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                device: str | torch.device = "cpu", cache: bool | str = "auto",
                cache_folder: str | Path | None = None, train_size: int | None = None, seed: int = 0,
                precision: str = "float32", project_dim: int | None = None, rerank: int | None = None,
                storage: str = "auto", chunk_rows: int | None = None):
    """Build (or load from cache) an index over every element of ``store``.

    Args:
        store: the :class:`~knn_cm.data.DataStore` (x-flipped copies included when it has them).
        kind: "flat" | "ivf" | "sq8" | "ivf_sq8" (faiss) | "torch" (no faiss, any device).
        nlist, nprobe, train_size, seed, precision, project_dim, rerank: see :class:`IndexSpec`.
        device: "cpu" (also for None) or "cuda[:i]". faiss kinds on CUDA need faiss-gpu (a clear error otherwise),
            except "flat", which falls back to the torch index when faiss has no GPU support.
        cache: True, False, or "auto" (cache trained faiss kinds and projections; a flat index is a copy of the
            data, cheaper to rebuild than to read). Projected searches cache their projection, and a faiss kind its
            index over the projected rows with it.
        cache_folder: where cached indexes live (default ``<cache_dir>/indexes``).
        storage: resident-row storage the torch index searches (and projected indexes rerank) in
            (see :meth:`DataStore.resident`; shared with estimators on the same device).
        chunk_rows: rows per top-k step of the torch index.

    Returns:
        a :class:`~knn_cm.search.faiss_index.FaissIndex` or :class:`~knn_cm.search.torch_index.TorchIndex`, wrapped
        in a :class:`~knn_cm.search.two_stage.TwoStageIndex` when ``project_dim`` is set.
    """
    device = as_device("cpu" if device is None else device, "index device")
    if kind == "flat" and (device.type == "meta" or (device.type == "cuda" and
                                                     not hasattr(faiss_module(), "StandardGpuResources"))):
        log.info("faiss has no GPU support: the flat index on %s is the torch index", device)
        kind = "torch"
    spec = IndexSpec(kind=kind, nlist=nlist, nprobe=nprobe, train_size=train_size, seed=seed, precision=precision,
                     project_dim=project_dim, rerank=rerank).resolved(len(store))
    projected = spec.project_dim is not None
    use_cache = (kind not in ("flat", "torch") or projected) if cache == "auto" else bool(cache)
    folder = Path(cache_folder) if cache_folder is not None else cache_dir() / "indexes"
    entry = CacheEntry(folder / f"{store.name}-{store.fingerprint}-{spec.cache_key()}")
    if kind == "torch":
        rows = store.resident(device, torch.float32, storage)
        if not projected:
            return TorchIndex(rows, spec, store.fingerprint, chunk_rows=chunk_rows)

        def fit():
            return None, Projection.fit(rows, spec.project_dim, PROJECTION_SAMPLE, spec.seed)

        _, projection = entry.load_or_build(store, spec, fit, with_index=False) if use_cache else fit()
        projection = projection.to(device)
        reduced = ResidentRows(projection.project_rows(rows), torch.float32, store.fingerprint)
        inner = TorchIndex(reduced, spec, store.fingerprint, chunk_rows=chunk_rows)
        return TwoStageIndex(inner, projection, rows, spec, store.fingerprint)
    device = check_faiss_device(device)
    if not projected:
        cpu_index, _ = entry.load_or_build(store, spec, lambda: (build_faiss_cpu(store, spec, device), None)) \
            if use_cache else (build_faiss_cpu(store, spec, device), None)
        return FaissIndex(faiss_to_device(cpu_index, device), spec, store.fingerprint, device)
    rows = store.resident("cpu", torch.float32, storage)

    def build():
        projection = Projection.fit(rows, spec.project_dim, PROJECTION_SAMPLE, spec.seed)
        return build_faiss_cpu(store, spec, device, vectors=projection.project_rows(rows)), projection

    cpu_index, projection = entry.load_or_build(store, spec, build) if use_cache else build()
    inner = FaissIndex(faiss_to_device(cpu_index, device), spec, store.fingerprint, device)
    return TwoStageIndex(inner, projection, rows, spec, store.fingerprint)
