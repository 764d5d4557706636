"""Memorisation: how close samples are to their nearest training images (Section 6).

For each sample, its nearest and second-nearest training images (exact L2 through a flat index). A sample
counts as a copy of its nearest training image when d_1 / d_2 < 1/3 (it is three times closer to one
training image than to any other), the usual criterion for diffusion-model memorisation.
"""

from __future__ import annotations

import torch

from knn_cm.data import DataStore
from knn_cm.search import FaissIndex, build_index


def memorisation(samples: torch.Tensor, store: DataStore, index: FaissIndex | None = None,
                 ratio_threshold: float = 1 / 3, batch_size: int = 1024) -> dict:
    """Memorisation statistics of samples [M, C, H, W] (float in [-1, 1]) against the training set.

    Returns:
        {"fraction_memorised": share of samples with d_1 / d_2 < ratio_threshold,
         "mean_nearest_distance": mean L2 distance d_1 to the nearest training image (data scale, [-1, 1]),
         "median_ratio": median d_1 / d_2, "num_samples": M,
         "nearest_indices": int64 [M], "nearest_distances": [M], "ratios": [M]}
    """
    if samples.ndim != 4 or tuple(samples.shape[1:]) != store.shape:
        raise ValueError(f"samples must be [M, {', '.join(map(str, store.shape))}] like the store, "
                         f"got {tuple(samples.shape)}")
    if len(store) < 2:
        raise ValueError("memorisation needs at least two training images")
    index = index or build_index(store, "flat")
    index.check_data(store)
    flat = samples.reshape(samples.shape[0], -1).float()
    distances, indices = [], []
    for start in range(0, flat.shape[0], batch_size):
        queries = flat[start : start + batch_size]
        _, ids = index.search(queries, 2)
        # Exact distances of the two found images (the index's GEMM distances are off by ~1e-3 in d^2).
        neighbours = store.float(ids.reshape(-1)).reshape(ids.shape[0], 2, -1)
        distances.append(torch.linalg.vector_norm(neighbours - queries.unsqueeze(1), dim=-1))
        indices.append(ids)
    distances, indices = torch.cat(distances), torch.cat(indices)
    ratios = distances[:, 0] / distances[:, 1].clamp(min=1e-12)
    return {"fraction_memorised": float((ratios < ratio_threshold).float().mean()),
            "mean_nearest_distance": float(distances[:, 0].mean()), "median_ratio": float(ratios.median()),
            "num_samples": int(flat.shape[0]), "nearest_indices": indices[:, 0], "nearest_distances": distances[:, 0],
            "ratios": ratios}
