"""ResidentRows: a DataStore's elements as flat rows [N, d] on one device, ready for estimators.

Estimators need two access patterns: gathering a few rows by index (KNN, MC, STF draws) and streaming
over all rows in chunks (exact posterior, GEMM distances). Rows are held either in the compute dtype
(fast) or as uint8 and converted on access (4x less memory for ImageNet-scale data).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from knn_cm.data.pixels import uint8_to_float

_BUILD_CHUNK = 8192


class ResidentRows:
    """Rows [N, d] of a store on ``device``; values in [-1, 1] when read in ``dtype``.

    Build with :meth:`DataStore.resident`, which caches one instance per device and dtype.
    """

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype, fingerprint: str):
        if rows.ndim != 2:
            raise ValueError(f"rows must be [N, d], got shape {tuple(rows.shape)}")
        self.rows = rows
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.is_uint8 = rows.dtype == torch.uint8
        # Squared norms ||x||^2 [N], accumulated in float64 so GEMM distances lose no more than the
        # product term's rounding.
        norms = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
        for start, chunk in self.chunks(_BUILD_CHUNK):
            norms[start : start + chunk.shape[0]] = chunk.to(torch.float64).square().sum(1)
        self.sq_norms = norms.to(dtype)
        self.max_sq_norm = float(norms.max())
        self._buffer: torch.Tensor | None = None

    @classmethod
    def from_store(cls, store, device: torch.device, dtype: torch.dtype, storage: str) -> "ResidentRows":
        """Copy every element of ``store`` (x-flipped copies included) to ``device``."""
        rows_dtype = torch.uint8 if storage == "uint8" else dtype
        rows = torch.empty(len(store), store.dim, dtype=rows_dtype, device=device)
        for start, chunk in store.iter_uint8(_BUILD_CHUNK):
            chunk = chunk.reshape(chunk.shape[0], -1).to(device)
            if rows_dtype != torch.uint8:
                chunk = uint8_to_float(chunk, rows_dtype)
            rows[start : start + chunk.shape[0]] = chunk
        return cls(rows, dtype=dtype, fingerprint=store.fingerprint)

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def _to_values(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_uint8:
            return raw
        return uint8_to_float(raw, self.dtype) if out is None else out.copy_(raw).div_(127.5).sub_(1.0)

    def gather(self, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [M, d] in ``dtype`` for int64 ``indices`` [M] (written into ``out`` when given)."""
        indices = indices.to(device=self.device, dtype=torch.long).reshape(-1)
        if self.is_uint8:
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

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, rows [m, d] in ``dtype``) over all rows in order."""
        for start in range(0, self.size, chunk_rows):
            yield start, self._to_values(self.rows[start : start + chunk_rows])

    def numpy_float32(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a contiguous float32 numpy array (for faiss)."""
        rows = self._to_values(self.rows[start:stop]).to(torch.float32)
        return np.ascontiguousarray(rows.cpu().numpy())
