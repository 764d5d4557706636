"""What an index is: its spec (kind, IVF cells, search precision, projection) and the checks of its inputs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

INDEX_KINDS = ("flat", "ivf", "sq8", "ivf_sq8", "torch")
SEARCH_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_precision(precision: str) -> torch.dtype:
    if precision not in SEARCH_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(SEARCH_PRECISIONS)}, got {precision!r}")
    return SEARCH_PRECISIONS[precision]


@dataclass(frozen=True)
class IndexSpec:
    """What to build. ``nprobe`` is a search setting and not part of the cache key.

    Attributes:
        kind: one of :data:`INDEX_KINDS`.
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

    def resolved(self, size: int) -> IndexSpec:
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
