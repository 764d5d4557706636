"""What a run writes besides checkpoints: EMA network snapshots and sample grids (paths from knn_cm.runs)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from knn_cm.data import float_to_uint8
from knn_cm.io import atomic_path


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None,
                    min_size: int = 256) -> Path:
    """Save images [B, C, H, W] in [-1, 1] as a PNG grid (upscaled by nearest neighbour to >= min_size px)."""
    import torchvision
    from PIL import Image

    columns = columns or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = torchvision.utils.make_grid(float_to_uint8(images.float()).cpu(), nrow=columns, padding=1, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if images.shape[1] == 1 else array)
    scale = max(1, math.ceil(min_size / max(picture.size)))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as temp:
        picture.save(temp, format="PNG")
    return Path(path)
