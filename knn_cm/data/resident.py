"""ResidentRows: a DataStore's elements as flat rows [N, d] on one device, ready for estimators and indexes.

Estimators need two access patterns: gathering a few rows by index (KNN, MC, STF draws) and streaming
over all rows in chunks (exact posterior, GEMM distances, the torch index). How the rows are held is the
``storage``:

- ``float``: rows in the compute dtype (fastest gathers on CPU; 4 bytes per value in float32);
- ``float16``: rows rounded to float16 (2 bytes per value; values off by at most 2.4e-4, 1/32 of a grey
  level), converted to the compute dtype on access;
- ``uint8``: the pixel bytes, converted on access (1 byte per value, exact: the default on CUDA);
- ``mapped``: CPU only, no copy at all: the store's own uint8 array (a ``np.memmap`` stays on disk and in
  the page cache), converted a chunk at a time.

Every storage but ``float16`` gives bit-identical values: ``u / 127.5 - 1`` computed in the compute dtype.

x-flip stays virtual in every storage and on every device: only the N stored images are held, and the
mirrored copies (elements N..2N-1) are made on read, by gathers and chunks alike, with the same values and
chunk boundaries as rows holding all 2N (tested bit for bit). Held twice, ImageNet-64 would need 31.5 GB
of uint8 rows per GPU instead of 15.7 GB.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

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
        flip_shape: (C, H, W) when the rows are the M stored images of an x-flip store: the store then
            has N = 2M elements, element M + i being row i mirrored left-right (made on read, never held).
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
    def from_store(cls, store, device: torch.device, dtype: torch.dtype, storage: str) -> ResidentRows:
        """Every element of ``store`` on ``device`` in ``storage``: its stored images held, x-flipped copies
        (when the store has them) made on read."""
        storage = resolve_storage(storage, device, len(store), store.dim, dtype)
        flip_shape = store.shape if store.xflip else None
        if storage == "mapped":
            with warnings.catch_warnings():  # a read-only memmap: rows are only ever read
                warnings.simplefilter("ignore", UserWarning)
                base = torch.from_numpy(np.asarray(store.images).reshape(store.base_size, -1))
            return cls(base, dtype=dtype, fingerprint=store.fingerprint, flip_shape=flip_shape)
        rows_dtype = {"uint8": torch.uint8, "float16": torch.float16, "float": dtype}[storage]
        rows = torch.empty(store.base_size, store.dim, dtype=rows_dtype, device=device)
        for start in range(0, store.base_size, _BUILD_CHUNK):
            stop = min(start + _BUILD_CHUNK, store.base_size)
            chunk = store.uint8(np.arange(start, stop)).reshape(stop - start, -1).to(device)
            if rows_dtype != torch.uint8:
                chunk = uint8_to_float(chunk, dtype).to(rows_dtype)
            rows[start:stop] = chunk
        return cls(rows, dtype=dtype, fingerprint=store.fingerprint, flip_shape=flip_shape)

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

    def gather(self, indices: torch.Tensor, out: torch.Tensor | None = None,
               fixed_shapes: bool | None = None) -> torch.Tensor:
        """Rows [M, d] in ``dtype`` for int64 ``indices`` [M] (written into ``out`` when given).

        Without x-flip: fixed shapes and no value-dependent branch, on every device. With x-flip, how the
        mirrored rows are made depends on ``fixed_shapes`` (default: on any device but the CPU):
        - fixed shapes: every gathered stored row is mirrored and the mirrored ones selected by mask
          (no host synchronisation: the CUDA path);
        - otherwise only the rows of mirrored elements are found and mirrored (faster on a CPU, where
          finding them costs nothing).
        Both give the same values.
        """
        indices = indices.to(device=self.device, dtype=torch.long).reshape(-1)
        if self.flip_shape is None:
            return self._gather_stored(indices, out)
        fixed_shapes = self.device.type != "cpu" if fixed_shapes is None else fixed_shapes
        flipped = indices >= self.base_size
        stored = torch.remainder(indices, self.base_size)
        if fixed_shapes:
            raw = self.rows.index_select(0, stored)  # mirrored while still in the stored dtype (fewest bytes)
            return self._to_values(torch.where(flipped.unsqueeze(1), self._mirror(raw), raw, out=raw), out)
        values = self._gather_stored(stored, out)
        mirrored = flipped.nonzero().squeeze(1)
        if mirrored.numel():
            values.index_copy_(0, mirrored, self._mirror(values.index_select(0, mirrored)))
        return values

    def _gather_stored(self, indices: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Stored rows [M, d] (indices < base_size) in ``dtype``, into ``out`` when given."""
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

    def raw_range(self, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) as rows [stop - start, d] unconverted (uint8 / float16 / dtype).

        Without x-flip (or before the mirrored half) a view of the stored rows; mirrored elements are made
        here, so a range reads exactly what rows holding all 2N elements would hold there.
        """
        base = self.base_size
        if self.flip_shape is None or stop <= base:
            return self.rows[start:stop]
        if start >= base:
            return self._mirror(self.rows[start - base : stop - base])
        return torch.cat([self.rows[start:base], self._mirror(self.rows[: stop - base])])

    def raw_chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows [m, d]) over all elements in order, unconverted (uint8 / float16 / dtype).

        Chunk boundaries are multiples of ``chunk_rows`` over all elements, x-flipped ones included, so
        matrix products over the chunks are the same as over rows that hold every element.
        """
        for start in range(0, self.size, chunk_rows):
            yield start, self.raw_range(start, min(start + chunk_rows, self.size))

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows [m, d] in ``dtype``) over all rows in order."""
        for start, raw in self.raw_chunks(chunk_rows):
            yield start, self._to_values(raw)

    def numpy_float32(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a contiguous float32 numpy array (for faiss)."""
        indices = torch.arange(start, stop, device=self.device)
        rows = self.gather(indices).to(torch.float32)
        return np.ascontiguousarray(rows.cpu().numpy())
