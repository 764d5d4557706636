"""An approximate, cached search over a bucketed bank of source vectors (the patch banks of the local denoisers).

A *bank* is M source vectors split into *buckets*: a query meets only the sources of its own bucket (ELS with
circular padding: one bucket of every window of every image; LS and PSPC: one bucket per location, the windows of
every image there; ELS with zero padding: one bucket per boundary class). The bank is not held: the index reads it
chunk by chunk through the :class:`Bank` protocol (the estimators gather windows from the store's resident rows).

The index is one faiss inverted file over every bucket at once. Content cells come from k-means over a uniform
sample of the bank (``cells`` centroids, shared by the buckets); source s lies in inverted list
``bucket(s) * cells + cell(s)``. A query of bucket b probes the lists ``b * cells + c`` of its ``nprobe`` nearest
centroids c, so one faiss call serves the queries of every bucket and no query meets a source of another bucket.
Lists hold the vectors as they are (``ivf``) or 8-bit scalar-quantised (``ivf_sq8``, 1 byte per value), with
their source ids (8 bytes each).

The search proposes candidates only: an estimator that needs exact distances recomputes them from the gathered
sources, and the KNN form's uniform tail covers every source the candidates miss, so the estimate stays
consistent (Algorithm 1, Eq. 11-13) whatever the index returns.

Indexes are cached on disk (``<cache_dir>/indexes/bank-...``) keyed by the data fingerprint, the bank's key (its
geometry: patch size, window, padding) and the build spec, built once under the entry's file lock
(:class:`~knn_cm.search.cache.CacheEntry`) and verified on load like the store indexes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from knn_cm.io import atomic_path, cache_dir, file_digest
from knn_cm.search.cache import CacheEntry, verified_meta
from knn_cm.search.faiss_index import faiss_module

log = logging.getLogger(__name__)

BANK_INDEX_KINDS = ("ivf", "ivf_sq8")
MAX_CELLS = 4096  # default cap: assigning M sources costs M * cells * dim
KMEANS_ITERATIONS = 10
TRAIN_PER_CELL = 40  # faiss's k-means asks for at least 39 training points per centroid
ADD_VALUES = 1 << 23  # values (sources x dim) read, assigned and added per step of a build
CANDIDATES_PER_NEIGHBOUR = 8  # the default nprobe scans about this many sources per neighbour asked for
MIN_NPROBE = 4


class Bank(Protocol):
    """What the index reads of a bank: M = ``size`` sources of ``dim`` values in ``buckets`` buckets."""

    size: int
    dim: int
    buckets: int
    fingerprint: str  # the data's fingerprint
    key: str  # the bank's geometry, for the cache key

    def vectors(self, start: int, stop: int) -> torch.Tensor:
        """Sources [start, stop) as float32 [stop - start, dim]."""

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Sources ``ids`` [m] as float32 [m, dim]."""

    def buckets_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The bucket of each source in ``ids`` [m]: int64 [m]."""


@dataclass(frozen=True)
class BankIndexSpec:
    """How to build and search a bank index.

    Attributes:
        kind: ``"ivf"`` (lists hold float32 vectors) or ``"ivf_sq8"`` (8-bit scalar quantiser, 4x less memory).
        cells: k-means centroids shared by the buckets (default round(sqrt(M / buckets)), at most
            :data:`MAX_CELLS`, at least 1).
        nprobe: cells probed per query, in the query's own bucket; a search setting, not part of the cache key.
            Default: enough cells for about :data:`CANDIDATES_PER_NEIGHBOUR` k candidates (k / the mean list size
            times that), at least :data:`MIN_NPROBE`, at most ``cells``.
        train_size: sources the k-means (and the quantiser) are trained on, drawn uniformly with ``seed``
            (default min(M, 40 cells), at least min(M, 4096)).
        seed: the training sample's and k-means' seed.
        cache: keep the built index on disk and reuse it (default True).
        cache_folder: where (default ``<cache_dir>/indexes``).
    """

    kind: str = "ivf_sq8"
    cells: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    seed: int = 0
    cache: bool = True
    cache_folder: str | None = None

    def __post_init__(self):
        if self.kind not in BANK_INDEX_KINDS:
            raise ValueError(f"search kind must be one of {', '.join(BANK_INDEX_KINDS)}, got {self.kind!r}")
        for name in ("cells", "nprobe", "train_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise ValueError(f"search {name} must be an integer >= 1 (or null for the default), got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"search seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_setting(cls, value) -> BankIndexSpec:
        """A spec from a kind name (``"ivf_sq8"``) or a mapping of the fields (a config's ``search`` block)."""
        if isinstance(value, BankIndexSpec):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {field.name for field in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"search.{unknown[0]} is not a setting of a bank index; allowed: "
                                 f"{', '.join(field.name for field in dataclasses.fields(cls))}")
            return cls(**value)
        raise ValueError(f"search must be a kind ({', '.join(BANK_INDEX_KINDS)}) or a mapping of its settings, "
                         f"got {value!r}")

    def resolved(self, size: int, buckets: int) -> BankIndexSpec:
        """The spec with the defaults filled in for a bank of ``size`` sources in ``buckets`` buckets."""
        cells = self.cells or max(1, min(MAX_CELLS, round(math.sqrt(size / buckets)), size // TRAIN_PER_CELL))
        cells = min(cells, size)
        train_size = min(size, self.train_size or max(TRAIN_PER_CELL * cells, 4096))
        nprobe = None if self.nprobe is None else min(self.nprobe, cells)
        return dataclasses.replace(self, cells=cells, nprobe=nprobe, train_size=train_size)

    def cache_key(self) -> str:
        return f"{self.kind}-c{self.cells}-t{self.train_size}-s{self.seed}"


class BankIndex:
    """A built bank index (the module docstring).

    Attributes:
        spec: the resolved :class:`BankIndexSpec`; ``size``, ``dim``, ``buckets``: the bank's.
        centroids: the shared content cells, a faiss ``IndexFlatL2`` of ``cells`` vectors.
        lists: the faiss inverted file (``buckets * cells`` lists).
        build_seconds: time spent building (0 when loaded from the cache); ``loaded``: whether it was.
    """

    def __init__(self, lists, spec: BankIndexSpec, size: int, dim: int, buckets: int, build_seconds: float = 0.0,
                 loaded: bool = False):
        faiss = faiss_module()
        self.lists = lists
        self.centroids = faiss.downcast_index(lists.quantizer)
        self.spec = spec
        self.size, self.dim, self.buckets = size, dim, buckets
        self.build_seconds = build_seconds
        self.loaded = loaded

    @property
    def memory_bytes(self) -> int:
        """Bytes the index holds: list codes and ids, and the centroids."""
        code_size = self.dim * (4 if self.spec.kind == "ivf" else 1)
        return self.size * (code_size + 8) + self.spec.cells * self.dim * 4

    def __repr__(self) -> str:
        return (f"BankIndex({self.spec.kind}, M={self.size}, d={self.dim}, buckets={self.buckets}, "
                f"cells={self.spec.cells}, nprobe={self.spec.nprobe or 'by k'})")

    def default_nprobe(self, k: int) -> int:
        """Cells to probe for about :data:`CANDIDATES_PER_NEIGHBOUR` k candidates per query."""
        mean_list = self.size / (self.buckets * self.spec.cells)
        return max(MIN_NPROBE, math.ceil(CANDIDATES_PER_NEIGHBOUR * k / mean_list))

    def search(self, queries: torch.Tensor, buckets: torch.Tensor, k: int,
               nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate sources of each query within its bucket.

        Args:
            queries: [Q, dim] (any float dtype; searched in float32 on the CPU).
            buckets: the bucket of each query, int64 [Q] in [0, buckets).
            k: candidates per query (>= 1).
            nprobe: cells probed per query (default the spec's, else by k: :class:`BankIndexSpec`).

        Returns:
            (sq_dists float32 [Q, k], ids int64 [Q, k]) on the CPU, nearest first by the index's (approximate, for
            ``ivf_sq8``) distances; a query whose probed lists hold fewer than k sources gets index -1 and
            distance +inf in the missing places.
        """
        from faiss.contrib.ivf_tools import search_preassigned

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        nprobe = min(nprobe or self.spec.nprobe or self.default_nprobe(int(k)), self.spec.cells)
        array = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(queries.shape)}")
        coarse_dists, cells = self.centroids.search(array, nprobe)
        cells = np.maximum(cells, 0)  # fewer centroids than nprobe cannot happen (nprobe <= cells)
        lists = buckets.to("cpu", torch.int64).numpy().reshape(-1, 1) * self.spec.cells + cells
        self.lists.nprobe = nprobe
        sq_dists, ids = search_preassigned(self.lists, array, int(k), lists.astype(np.int64), coarse_dists)
        sq_dists, ids = torch.from_numpy(sq_dists), torch.from_numpy(ids)
        return sq_dists.masked_fill(ids < 0, math.inf), ids


def _empty_lists(spec: BankIndexSpec, dim: int, buckets: int, centroids: np.ndarray):
    faiss = faiss_module()
    quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(centroids)
    nlist = buckets * spec.cells
    if spec.kind == "ivf":
        lists = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
    else:
        lists = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_L2, False)  # codes of the vectors, not of residuals
    lists.own_fields = True
    quantizer.this.disown()  # the index owns (and frees) its quantizer
    return lists


def _train(bank: Bank, spec: BankIndexSpec):
    """The empty inverted file with trained centroids (and quantiser): k-means on a uniform sample."""
    faiss = faiss_module()
    generator = np.random.default_rng(spec.seed)
    sample_ids = np.sort(generator.choice(bank.size, size=spec.train_size, replace=False))
    sample = np.ascontiguousarray(bank.gather(torch.from_numpy(sample_ids)).to(torch.float32).numpy())
    if spec.cells > 1:
        kmeans = faiss.Kmeans(bank.dim, spec.cells, niter=KMEANS_ITERATIONS, seed=spec.seed,
                              max_points_per_centroid=max(TRAIN_PER_CELL, -(-spec.train_size // spec.cells)))
        kmeans.train(sample)
        centroids = kmeans.centroids
    else:
        centroids = sample.mean(0, keepdims=True)
    lists = _empty_lists(spec, bank.dim, bank.buckets, np.ascontiguousarray(centroids, dtype=np.float32))
    if spec.kind == "ivf_sq8":
        lists.sq.train(sample)
    lists.is_trained = True
    return lists


def _fill(lists, bank: Bank, spec: BankIndexSpec) -> None:
    """Add every source, a chunk at a time, to list ``bucket * cells + nearest centroid``."""
    from faiss.contrib.ivf_tools import add_preassigned

    centroids = faiss_module().downcast_index(lists.quantizer)
    step = max(1, ADD_VALUES // bank.dim)
    for start in range(0, bank.size, step):
        stop = min(start + step, bank.size)
        vectors = np.ascontiguousarray(bank.vectors(start, stop).to(torch.float32).numpy())
        _, cells = centroids.search(vectors, 1)
        buckets = bank.buckets_of(torch.arange(start, stop)).numpy()
        add_preassigned(lists, vectors, (buckets * spec.cells + cells[:, 0]).astype(np.int64))


def build_bank_index(bank: Bank, spec: BankIndexSpec | str | dict = "ivf_sq8") -> BankIndex:
    """Build the index of ``bank``, or load it from the cache (the module docstring)."""
    spec = BankIndexSpec.from_setting(spec).resolved(bank.size, bank.buckets)

    def build() -> BankIndex:
        start = time.perf_counter()
        lists = _train(bank, spec)
        _fill(lists, bank, spec)
        seconds = time.perf_counter() - start
        log.info("bank index %s over %d sources built in %.1f s", spec.cache_key(), bank.size, seconds)
        return BankIndex(lists, spec, bank.size, bank.dim, bank.buckets, build_seconds=seconds)

    if not spec.cache:
        return build()
    folder = Path(spec.cache_folder) if spec.cache_folder is not None else cache_dir() / "indexes"
    entry = CacheEntry(folder / f"bank-{bank.fingerprint}-{bank.key}-{spec.cache_key()}")
    with entry.lock():
        cached = _load(entry, bank, spec)
        if cached is not None:
            return cached
        index = build()
        _save(entry, index, bank, spec)
        return index


def _metadata(bank: Bank, spec: BankIndexSpec) -> dict:
    build_spec = dataclasses.replace(spec, nprobe=None, cache=True, cache_folder=None)
    return {"fingerprint": bank.fingerprint, "bank": bank.key, "spec": dataclasses.asdict(build_spec),
            "size": bank.size, "dim": bank.dim, "buckets": bank.buckets}


def _save(entry: CacheEntry, index: BankIndex, bank: Bank, spec: BankIndexSpec) -> None:
    faiss = faiss_module()
    with atomic_path(entry.index_path) as temp:
        faiss.write_index(index.lists, str(temp))
        meta = _metadata(bank, spec) | {"digest": file_digest(temp), "faiss_version": faiss.__version__,
                                        "build_seconds": index.build_seconds}
    with atomic_path(entry.meta_path) as temp:
        temp.write_text(json.dumps(meta, indent=1))


def _load(entry: CacheEntry, bank: Bank, spec: BankIndexSpec) -> BankIndex | None:
    if not (entry.meta_path.exists() and entry.index_path.exists()):
        return None
    meta = verified_meta(entry.meta_path, _metadata(bank, spec), {"digest": entry.index_path}, "bank index")
    if meta is None:
        return None
    lists = faiss_module().read_index(str(entry.index_path))
    if lists.ntotal != bank.size or lists.d != bank.dim or lists.nlist != bank.buckets * spec.cells:
        log.warning("cached bank index %s has the wrong size; rebuilding", entry.index_path)
        return None
    return BankIndex(lists, spec, bank.size, bank.dim, bank.buckets, build_seconds=meta.get("build_seconds", 0.0),
                     loaded=True)
