"""Nearest-neighbour indexes over a DataStore: specs, building, searching, and an on-disk cache.

Kinds (Appendix D.5 of the paper): ``flat`` exact L2; ``ivf`` inverted file with ``nlist`` cells
searched over ``nprobe`` of them; ``sq8`` 8-bit scalar quantiser (4x less memory); ``ivf_sq8`` both
(all faiss); ``torch`` exact L2 by chunked matrix products in torch on any device, no faiss
(:mod:`knn_cm.torch_index`; search ``precision`` float32, float16 or bfloat16). Any kind can search a
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

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from knn_cm.device import as_device
from knn_cm.estimators.base import isolated_numerics
from knn_cm.io import atomic_path, cache_dir, file_digest

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "sq8", "ivf_sq8", "torch")
_ADD_CHUNK = 16384
PROJECTION_SAMPLE = 16384  # elements the PCA of projected searches is fitted on


def _faiss():
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """What to build. ``nprobe`` is a search setting and not part of the cache key.

    Attributes:
        kind: one of "flat", "ivf", "sq8", "ivf_sq8".
        nlist: IVF cells c (default round(4 sqrt(N)), faiss's usual choice); IVF kinds only.
        nprobe: IVF cells searched per query p (default max(1, nlist // 16)); IVF kinds only.
        train_size: elements used to train k-means / the quantiser (default min(N, 64 nlist) for
            IVF, min(N, 65,536) for sq8). Training draws them with ``seed``.
        seed: seed of the training subsample and of faiss's k-means.
        precision: matrix-product dtype of the ``torch`` kind: "float32" (exact), "float16", "bfloat16".
        project_dim: search m principal components (plus a residual-norm coordinate) instead of the
            d pixels (None: the full space). Fitted on min(N, 16,384) elements drawn with ``seed``.
        rerank: with ``project_dim``, candidates whose exact distance is recomputed before the k
            nearest are kept (None or 0: reduced-space distances only).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    seed: int = 0
    precision: str = "float32"
    project_dim: int | None = None
    rerank: int | None = None

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; allowed: {', '.join(INDEX_KINDS)}")
        is_ivf = self.kind.startswith("ivf")
        for name in ("nlist", "nprobe", "train_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not is_ivf and (self.nlist is not None or self.nprobe is not None):
            raise ValueError(f"nlist and nprobe apply to IVF kinds (ivf, ivf_sq8), not to {self.kind!r}")
        from knn_cm.torch_index import check_precision

        check_precision(self.precision)
        if self.precision != "float32" and self.kind != "torch":
            raise ValueError(f"precision {self.precision!r} applies to the 'torch' kind, not to {self.kind!r}")
        for name in ("project_dim", "rerank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0
                                      or (name == "project_dim" and value < 1)):
                raise ValueError(f"{name} must be a positive integer (or null), got {value!r}")
        if self.rerank and self.project_dim is None:
            raise ValueError("rerank applies to projected searches: set project_dim too")

    def resolved(self, size: int) -> "IndexSpec":
        """The spec with defaults filled in for a dataset of ``size`` elements."""
        nlist, nprobe, train_size = self.nlist, self.nprobe, self.train_size
        if self.kind.startswith("ivf"):
            nlist = nlist or max(1, min(size, round(4 * math.sqrt(size))))
            if nlist > size:
                raise ValueError(f"nlist={nlist} exceeds the dataset size N={size}")
            nprobe = min(nprobe or max(1, nlist // 16), nlist)
            train_size = min(size, train_size or 64 * nlist)
        elif self.kind == "sq8":
            train_size = min(size, train_size or 65536)
        return dataclasses.replace(self, nlist=nlist, nprobe=nprobe, train_size=train_size)

    def cache_key(self) -> str:
        parts = [self.kind] + [f"{n}{getattr(self, n)}" for n in ("nlist", "train_size", "seed", "project_dim")
                               if getattr(self, n) is not None]
        return "-".join(parts)


class Index:
    """A built faiss index tied to the data it was built from.

    Attributes:
        spec: the resolved :class:`IndexSpec`.
        data_fingerprint: :attr:`DataStore.fingerprint` of the indexed data.
        size: number of indexed elements N; ``dim``: vector dimension d.
        device: where searches run ("cpu" or a CUDA device).
    """

    def __init__(self, faiss_index, spec: IndexSpec, data_fingerprint: str, device: torch.device,
                 projection=None, rows=None):
        self.faiss_index = faiss_index
        self.spec = spec
        self.data_fingerprint = data_fingerprint
        self.device = torch.device(device)
        self.size = int(faiss_index.ntotal)
        self.projection = projection  # knn_cm.torch_index.Projection when the index holds reduced vectors
        self.rows = rows  # resident rows for the exact rerank of projected searches
        self.dim = int(faiss_index.d) if projection is None else int(projection.mean.shape[0])
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
        faiss = _faiss()
        if self.device.type == "cuda":
            faiss.GpuParameterSpace().set_index_parameter(self.faiss_index, "nprobe", int(value))
        else:
            faiss.extract_index_ivf(self.faiss_index).nprobe = int(value)

    def __repr__(self) -> str:
        return f"Index({self.spec}, N={self.size}, d={self.dim}, device={self.device})"

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
        if self.projection is None:
            return self._faiss_search(queries, k)
        # The projection and the exact rerank are torch products: IEEE float32 whatever the caller set.
        with isolated_numerics(torch.device("cpu")):
            return self._projected_search(queries, k)

    def _projected_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from knn_cm.torch_index import exact_sq_dists

        out_device = queries.device
        queries = queries.detach().to("cpu", torch.float32)
        reduced, residual = self.projection.project_queries(queries)
        candidates = min(self.size, max(k, self.spec.rerank or 0))
        sq_dists, indices = self._faiss_search(reduced, candidates)
        sq_dists = sq_dists + residual.unsqueeze(1)
        reranked = min(self.spec.rerank or 0, candidates)
        if reranked:
            head = indices[:, :reranked]
            exact = exact_sq_dists(queries, self.rows, head.clamp(min=0)).masked_fill(head < 0, math.inf)
            sq_dists = torch.cat([exact, sq_dists[:, reranked:]], dim=1)
            sq_dists, order = sq_dists.topk(k, dim=1, largest=False, sorted=True)
            indices = indices.gather(1, order)
        return sq_dists[:, :k].to(out_device), indices[:, :k].to(out_device)

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


def check_search_input(queries: torch.Tensor, k, dim: int, size: int) -> tuple[torch.Tensor, int]:
    """(queries as [B, d], k clamped to N); a ValueError naming the problem otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    queries = queries.reshape(queries.shape[0], -1)
    if queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the index holds d={dim}")
    return queries, min(int(k), size)


def check_index_data(index, store) -> None:
    """Raise ValueError unless ``index`` was built from exactly ``store``'s elements."""
    if index.data_fingerprint != store.fingerprint:
        raise ValueError(
            f"index was built for other data (fingerprint {index.data_fingerprint}) than the store "
            f"{store.name!r} (fingerprint {store.fingerprint}); build it from this store with build_index")
    if index.size != len(store) or index.dim != store.dim:
        raise ValueError(f"index holds N={index.size}, d={index.dim} but the store has N={len(store)}, d={store.dim}")


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
        an :class:`Index` (faiss) or a :class:`~knn_cm.torch_index.TorchIndex`.
    """
    device = as_device("cpu" if device is None else device, "index device")
    if kind == "flat" and device.type == "cuda" and not hasattr(_faiss(), "StandardGpuResources"):
        log.info("faiss has no GPU support: the flat index on %s is the torch index", device)
        kind = "torch"
    spec = IndexSpec(kind=kind, nlist=nlist, nprobe=nprobe, train_size=train_size, seed=seed, precision=precision,
                     project_dim=project_dim, rerank=rerank).resolved(len(store))
    projected = spec.project_dim is not None
    use_cache = (kind not in ("flat", "torch") or projected) if cache == "auto" else bool(cache)
    folder = Path(cache_folder) if cache_folder is not None else cache_dir() / "indexes"
    entry = CacheEntry(folder / f"{store.name}-{store.fingerprint}-{spec.cache_key()}")
    if kind == "torch":
        from knn_cm.torch_index import Projection, TorchIndex

        rows = store.resident(device, torch.float32, storage)
        projection = None
        if projected:
            def fit():
                return None, Projection.fit(rows, spec.project_dim, PROJECTION_SAMPLE, spec.seed)

            _, projection = entry.load_or_build(store, spec, fit, with_index=False) if use_cache else fit()
        return TorchIndex(rows, spec, store.fingerprint, projection=projection, chunk_rows=chunk_rows)
    device = _check_device(device)
    rows = store.resident("cpu", torch.float32, storage) if projected else None

    def build():
        if not projected:
            return _build_cpu(store, spec, device), None
        from knn_cm.torch_index import Projection

        projection = Projection.fit(rows, spec.project_dim, PROJECTION_SAMPLE, spec.seed)
        return _build_cpu(store, spec, device, vectors=projection.project_rows(rows)), projection

    cpu_index, projection = entry.load_or_build(store, spec, build) if use_cache else build()
    return Index(_to_device(cpu_index, device), spec, store.fingerprint, device, projection=projection, rows=rows)


# ------------------------------------------------------------------------------------------ helpers
def _check_device(device) -> torch.device:
    device = as_device(device, "index device")
    if device.type == "cuda" and not hasattr(_faiss(), "StandardGpuResources"):
        raise ValueError(f"index device {device} requested but the installed faiss has no GPU support; "
                         f"install faiss-gpu (pip install 'knn-cm[gpu]') or use device='cpu'")
    return device


def _build_cpu(store, spec: IndexSpec, device: torch.device, vectors: torch.Tensor | None = None):
    """The faiss index over the store's rows, or over ``vectors`` [N, m] (projected rows) when given."""
    faiss = _faiss()
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
        trainer = _to_device(index, device) if device.type == "cuda" else index
        trainer.train(training)
        if trainer is not index:
            index = faiss.index_gpu_to_cpu(trainer)
    for start in range(0, rows.size, _ADD_CHUNK):
        index.add(rows.numpy_float32(start, min(start + _ADD_CHUNK, rows.size)))
    return index


def _to_device(cpu_index, device: torch.device):
    if device.type == "cpu":
        return cpu_index
    faiss = _faiss()
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, device.index or 0, cpu_index)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index
    return gpu_index


def _metadata(store, spec: IndexSpec) -> dict:
    """What a cache entry must have been built from: the data and the build spec (search settings left out)."""
    build_spec = dataclasses.replace(spec, nprobe=None, rerank=None, precision="float32")
    meta = {"fingerprint": store.fingerprint, "spec": dataclasses.asdict(build_spec), "size": len(store),
            "dim": store.dim}
    if spec.project_dim is not None:
        meta["projection_sample"] = PROJECTION_SAMPLE
    return meta


class CacheEntry:
    """One cached index in the cache folder: ``<base>.faiss`` (the CPU faiss index, when there is one),
    ``<base>.projection.pt`` (a projected search's PCA), ``<base>.json`` (what they were built from and their
    digests, written last: an entry without it is incomplete) and ``<base>.lock`` (held while building)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.index_path = self._file(".faiss")
        self.projection_path = self._file(".projection.pt")
        self.meta_path = self._file(".json")
        self.lock_path = self._file(".lock")

    def _file(self, suffix: str) -> Path:
        return self.base.with_name(self.base.name + suffix)

    def load_or_build(self, store, spec: IndexSpec, build, with_index: bool = True):
        """(CPU faiss index or None, Projection or None): loaded when cached and valid, else ``build()`` and saved.

        Under the entry's lock, so that concurrent callers build it once and the others load it.
        """
        with self.lock():
            cached = self.load(store, spec, with_index)
            if cached is not None:
                return cached
            cpu_index, projection = build()
            self.save(cpu_index, projection, store, spec)
            return cpu_index, projection

    @contextlib.contextmanager
    def lock(self):
        """Hold the entry's file lock (``flock``: released by the kernel when the holder dies, also on kill -9).

        Waits, logging who holds it, while another process builds the entry. On a file system without locks
        (some network mounts) it warns and goes on unlocked: each process then builds, and the atomic writes keep
        the entry whole.
        """
        self.base.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    log.info("index cache %s is being built by %s: waiting for it", self.base.name, holder)
                    fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("cannot lock %s (%s): building without the lock", self.lock_path, error)
                yield
                return
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield  # closing the handle releases the lock

    def save(self, cpu_index, projection, store, spec: IndexSpec) -> None:
        meta = _metadata(store, spec)
        if cpu_index is not None:
            faiss = _faiss()
            with atomic_path(self.index_path) as temp:
                faiss.write_index(cpu_index, str(temp))
                meta |= {"digest": file_digest(temp), "faiss_version": faiss.__version__}
        if projection is not None:
            with atomic_path(self.projection_path) as temp:
                torch.save({"mean": projection.mean.cpu(), "basis": projection.basis.cpu()}, temp)
                meta["projection_digest"] = file_digest(temp)
        with atomic_path(self.meta_path) as temp:
            temp.write_text(json.dumps(meta, indent=1))

    def load(self, store, spec: IndexSpec, with_index: bool = True):
        """(CPU faiss index or None, Projection or None) when the entry exists and verifies, else None."""
        projected = spec.project_dim is not None
        paths = [self.meta_path] + [self.index_path] * with_index + [self.projection_path] * projected
        if not all(path.exists() for path in paths):
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable index metadata %s (%s); rebuilding", self.meta_path, error)
            return None
        expected = _metadata(store, spec)
        if (any(meta.get(key) != value for key, value in expected.items())
                or (with_index and meta.get("digest") != file_digest(self.index_path))
                or (projected and meta.get("projection_digest") != file_digest(self.projection_path))):
            log.warning("cached index %s does not match its data or spec; rebuilding", self.base)
            return None
        index = projection = None
        if with_index:
            index = _faiss().read_index(str(self.index_path))
            dim = store.dim if not projected else spec.project_dim + 1
            if index.ntotal != len(store) or index.d != dim:
                log.warning("cached index %s has the wrong size; rebuilding", self.index_path)
                return None
        if projected:
            from knn_cm.torch_index import Projection

            saved = torch.load(self.projection_path, map_location="cpu", weights_only=True)
            projection = Projection(saved["mean"], saved["basis"])
        return index, projection
