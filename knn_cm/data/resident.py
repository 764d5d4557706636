"""ResidentRows: a DataStore's elements as flat rows [N, d] on one device, ready for estimators and indexes.

Estimators need two access patterns: gathering a few rows by index (KNN, MC, STF draws) and streaming
over all rows in chunks (exact posterior, GEMM distances, the torch index). How the rows are held is the
``storage``:

- ``float``: rows in the compute dtype (fastest gathers on CPU; 4 bytes per value in float32);
- ``float16``: rows rounded to float16 (2 bytes per value; values off by at most 2.4e-4, 1/32 of a grey
  level), converted to the compute dtype on access;
- ``uint8``: the pixel bytes, converted on access (1 byte per value, exact: the default on CUDA);
- ``mapped``: CPU only, no copy at all: the store's own uint8 array (a ``np.memmap`` stays on disk and in
  the page cache), converted a chunk at a time; x-flipped copies are mirrored on read.

Every storage but ``float16`` gives bit-identical values: ``u / 127.5 - 1`` computed in the compute dtype.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from knn_cm.data.pixels import uint8_to_float

_BUILD_CHUNK = 8192
STORAGES = ("auto", "float", "float16", "uint8", "mapped")
# "auto" keeps float rows on CPU up to this many bytes (beyond, it maps the store's array instead).
AUTO_FLOAT_BYTES = 4 << 30


def resolve_storage(storage: str, device: torch.device, size: int, dim: int, dtype: torch.dtype) -> str:
    """The concrete storage for ``storage`` ("auto": uint8 on CUDA; on CPU float up to 4 GiB, else mapped)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(map(repr, STORAGES))}, got {storage!r}")
    if storage == "mapped" and device.type != "cpu":
        raise ValueError(f"storage 'mapped' reads the store's array in place and needs device 'cpu', got {device}; "
                         f"use 'uint8' or 'float16' on {device.type}")
    if storage != "auto":
        return storage
    if device.type != "cpu":
        return "uint8"
    bytes_needed = size * dim * torch.tensor([], dtype=dtype).element_size()
    return "float" if bytes_needed <= AUTO_FLOAT_BYTES else "mapped"


class ResidentRows:
    """Rows [N, d] of a store on ``device``; values in [-1, 1] when read in ``dtype``.

    Build with :meth:`DataStore.resident`, which caches one instance per device, dtype and storage.

    Args:
        rows: stored rows [M, d] (uint8, float16 or ``dtype``).
        dtype: the compute dtype values are read in.
        fingerprint: the store's fingerprint.
        flip_shape: (C, H, W) when the rows are the M base images of an x-flip store read in place: the
            store then has N = 2M elements, element M + i being row i mirrored left-right.
    """

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype, fingerprint: str,
                 flip_shape: tuple[int, int, int] | None = None):
        if rows.ndim != 2:
            raise ValueError(f"rows must be [N, d], got shape {tuple(rows.shape)}")
        self.rows = rows
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.flip_shape = flip_shape
        self.base_size = int(rows.shape[0])
        self.is_uint8 = rows.dtype == torch.uint8
        # Squared norms ||x||^2 [N], accumulated in float64 so GEMM distances lose no more than the
        # product term's rounding.
        norms = torch.empty(self.size, dtype=torch.float64, device=rows.device)
        for start, chunk in self.chunks(_BUILD_CHUNK):
            norms[start : start + chunk.shape[0]] = chunk.to(torch.float64).square().sum(1)
        self.sq_norms = norms.to(dtype)
        # A host float, computed once here, so that no call has to read it back from the device.
        self.max_sq_norm = float(norms.max())
        self._buffer: torch.Tensor | None = None

    @classmethod
    def from_store(cls, store, device: torch.device, dtype: torch.dtype, storage: str) -> "ResidentRows":
        """Every element of ``store`` (x-flipped copies included) on ``device`` in ``storage``."""
        storage = resolve_storage(storage, device, len(store), store.dim, dtype)
        if storage == "mapped":
            with warnings.catch_warnings():  # a read-only memmap: rows are only ever read
                warnings.simplefilter("ignore", UserWarning)
                base = torch.from_numpy(np.asarray(store.images).reshape(store.base_size, -1))
            return cls(base, dtype=dtype, fingerprint=store.fingerprint,
                       flip_shape=store.shape if store.xflip else None)
        rows_dtype = {"uint8": torch.uint8, "float16": torch.float16, "float": dtype}[storage]
        rows = torch.empty(len(store), store.dim, dtype=rows_dtype, device=device)
        for start, chunk in store.iter_uint8(_BUILD_CHUNK):
            chunk = chunk.reshape(chunk.shape[0], -1).to(device)
            if rows_dtype != torch.uint8:
                chunk = uint8_to_float(chunk, dtype).to(rows_dtype)
            rows[start : start + chunk.shape[0]] = chunk
        return cls(rows, dtype=dtype, fingerprint=store.fingerprint)

    @property
    def size(self) -> int:
        return self.base_size * (2 if self.flip_shape else 1)

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def storage_bytes(self) -> int:
        """Bytes this object holds or maps for the rows themselves."""
        return self.rows.numel() * self.rows.element_size()

    def _to_values(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if raw.dtype == self.dtype:
            return raw if out is None else out.copy_(raw)
        if self.is_uint8:
            return uint8_to_float(raw, self.dtype) if out is None else out.copy_(raw).div_(127.5).sub_(1.0)
        return raw.to(self.dtype) if out is None else out.copy_(raw)

    def _mirror(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.view(-1, *self.flip_shape).flip(-1).reshape(raw.shape)

    def gather(self, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [M, d] in ``dtype`` for int64 ``indices`` [M] (written into ``out`` when given).

        Fixed shapes and no value-dependent branch: safe on CUDA without host synchronisation.
        """
        indices = indices.to(device=self.device, dtype=torch.long).reshape(-1)
        if self.flip_shape is not None:
            raw = self.rows.index_select(0, torch.remainder(indices, self.base_size))
            raw = torch.where((indices >= self.base_size).unsqueeze(1), self._mirror(raw), raw)
            return self._to_values(raw, out)
        if self.rows.dtype != self.dtype:
            return self._to_values(self.rows.index_select(0, indices), out)
        if out is None:
            return self.rows.index_select(0, indices)
        return torch.index_select(self.rows, 0, indices, out=out)

    def gather_scratch(self, indices: torch.Tensor) -> torch.Tensor:
        """Like :meth:`gather` but into a buffer reused across calls (valid until the next call).

        Reuse matters on CPU: a fresh multi-hundred-MB tensor per call costs more in page faults
        than the gather itself.
        """
        count = int(indices.numel())
        if self._buffer is None or self._buffer.shape[0] < count:
            self._buffer = torch.empty(max(count, 256), self.dim, dtype=self.dtype, device=self.device)
        return self.gather(indices, out=self._buffer[:count])

    def raw_chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, stored rows [m, d]) over all elements in order, unconverted (uint8 / float16 / dtype)."""
        for start in range(0, self.base_size, chunk_rows):
            yield start, self.rows[start : start + chunk_rows]
        if self.flip_shape is not None:
            for start in range(0, self.base_size, chunk_rows):
                yield self.base_size + start, self._mirror(self.rows[start : start + chunk_rows])

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows [m, d] in ``dtype``) over all rows in order."""
        for start, raw in self.raw_chunks(chunk_rows):
            yield start, self._to_values(raw)

    def numpy_float32(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a contiguous float32 numpy array (for faiss)."""
        indices = torch.arange(start, stop, device=self.device)
        rows = self.gather(indices).to(torch.float32)
        return np.ascontiguousarray(rows.cpu().numpy())
