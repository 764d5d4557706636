"""DataStore: a dataset of uint8 images [N, C, H, W] with a float view in [-1, 1] and a fingerprint.

The store is the single owner of the training set that every estimator and index reads. Images stay
uint8 (memory-mapped when large, e.g. ImageNet-64 is 16 GB); float views are made on demand and
cached per device by :meth:`DataStore.resident`.

With ``xflip=True`` the store presents 2N elements: element ``i < N`` is image ``i`` and element
``N + i`` is image ``i`` mirrored left-right. When training uses x-flip augmentation, the estimator's
empirical distribution must include the flipped copies so it targets the distribution the model sees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from knn_cm.data.pixels import uint8_to_float
from knn_cm.data.resident import ResidentRows, resolve_storage
from knn_cm.device import concrete_device

_FINGERPRINT_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts that configs and models need: ``channels``, ``resolution`` (H == W), ``size`` N."""

    name: str
    size: int
    channels: int
    height: int
    width: int

    @property
    def resolution(self) -> int:
        return self.height

    @property
    def dim(self) -> int:
        return self.channels * self.height * self.width


class DataStore:
    """A dataset as uint8 [N, C, H, W] with a float view in [-1, 1] and a content fingerprint.

    Args:
        images: uint8 array [N, C, H, W] (numpy array, ``np.memmap`` or CPU tensor).
        name: a label for logs and cache file names.
        labels: optional int64 [N] class labels (kept for conditional models; estimators ignore them).
        xflip: present 2N elements, the second half mirrored left-right.
    """

    def __init__(self, images, name: str = "array", labels=None, xflip: bool = False):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got shape {tuple(images.shape)}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
        if images.shape[0] < 1:
            raise ValueError("images is empty: a DataStore needs at least one image")
        if images.shape[1] not in (1, 2, 3, 4):
            raise ValueError(f"images must be channels-first [N, C, H, W] with C in 1..4, got {tuple(images.shape)}")
        self.images = images
        self.name = name
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != images.shape[0]:
            raise ValueError(f"labels has {len(self.labels)} entries but images has {images.shape[0]}")
        self.xflip = bool(xflip)
        self._base_fingerprint: str | None = None
        self._resident: dict[tuple[str, torch.dtype, str], ResidentRows] = {}

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_array(cls, images, name: str = "array", labels=None, xflip: bool = False) -> DataStore:
        """A store over an in-memory uint8 array [N, C, H, W] (numpy or torch)."""
        return cls(images, name=name, labels=labels, xflip=xflip)

    def with_xflip(self, xflip: bool = True) -> DataStore:
        """The same images with x-flip doubling switched on (or off); shares the underlying array."""
        store = DataStore(self.images, name=self.name, labels=self.labels, xflip=xflip)
        store._base_fingerprint = self._base_fingerprint
        return store

    # ------------------------------------------------------------------------------------- describe
    @property
    def base_size(self) -> int:
        """Number of stored images (without x-flip doubling)."""
        return int(self.images.shape[0])

    def __len__(self) -> int:
        return self.base_size * (2 if self.xflip else 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape (C, H, W)."""
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def dim(self) -> int:
        """Flattened dimension d = C * H * W."""
        channels, height, width = self.shape
        return channels * height * width

    @property
    def info(self) -> DatasetInfo:
        channels, height, width = self.shape
        return DatasetInfo(self.name, len(self), channels, height, width)

    @property
    def fingerprint(self) -> str:
        """Content hash of the images (blake2b over shape and bytes) plus the x-flip flag.

        Indexes and caches are keyed by it, so an index built for other data is never used silently.
        """
        if self._base_fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr(tuple(self.images.shape)).encode())
            flat = self.images.reshape(-1)
            for start in range(0, flat.shape[0], _FINGERPRINT_CHUNK_BYTES):
                digest.update(np.ascontiguousarray(flat[start : start + _FINGERPRINT_CHUNK_BYTES]).data)
            self._base_fingerprint = digest.hexdigest()
        return self._base_fingerprint + ("-xflip" if self.xflip else "")

    def __repr__(self) -> str:
        return (
            f"DataStore(name={self.name!r}, N={len(self)}, shape={self.shape}, xflip={self.xflip}, "
            f"memmap={isinstance(self.images, np.memmap)})"
        )

    # ------------------------------------------------------------------------------------------ read
    def _check_indices(self, indices: np.ndarray) -> None:
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self)}), got range [{indices.min()}, {indices.max()}]")

    def uint8(self, indices: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images [M, C, H, W] for the given element indices (all elements when None)."""
        if indices is None:
            indices = np.arange(len(self))
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check_indices(indices)
        base = indices % self.base_size
        rows = np.asarray(self.images[base])
        if self.xflip:
            flipped = indices >= self.base_size
            rows = rows.copy()
            rows[flipped] = rows[flipped][..., ::-1]
        return torch.from_numpy(np.ascontiguousarray(rows))

    def float(self, indices=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float images [M, C, H, W] in [-1, 1] for the given element indices (all when None)."""
        return uint8_to_float(self.uint8(indices), dtype)

    def iter_uint8(self, chunk_size: int = 4096):
        """Yield (start, uint8 [m, C, H, W]) over every element in order, x-flipped copies last."""
        for start in range(0, len(self), chunk_size):
            stop = min(start + chunk_size, len(self))
            yield start, self.uint8(np.arange(start, stop))

    def resident(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 storage: str = "auto") -> ResidentRows:
        """The whole store as rows [N, d] on ``device``, cached per (device, dtype, storage).

        Args:
            device: where estimators compute.
            dtype: compute dtype of gathered rows (float32, or float64 for reference computations).
            storage: how rows are held (see :mod:`knn_cm.data.resident`): "float" (compute dtype),
                "float16", "uint8" (converted on access), "mapped" (CPU: the store's own array, no copy)
                or "auto" (uint8 on CUDA; on CPU float up to 4 GiB, else mapped).
        """
        device = concrete_device(device)  # "cuda" and "cuda:N" are one entry
        storage = resolve_storage(storage, device, len(self), self.dim, dtype)
        key = (str(device), dtype, storage)
        if key not in self._resident:
            self._resident[key] = ResidentRows.from_store(self, device=device, dtype=dtype, storage=storage)
        return self._resident[key]
