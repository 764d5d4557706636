"""Row-wise sorting for the estimators' index bookkeeping, fast on every device.

torch's CPU sort of rows such as [128, 2048] is several times slower than NumPy's (int64 and float32
alike; docs/benchmarks.md): on the CPU the rows are sorted by NumPy (the tensors share memory, no copy in), on
other devices (and for bfloat16, which NumPy lacks) by torch.sort. Ties may come out in either order, as
with torch.sort; NaN sorts last in both.
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy_sorts(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and values.dtype != torch.bfloat16


def sort_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted values, order) of each row of ``values`` [B, m], ascending, like ``values.sort(dim=1)``."""
    if not _numpy_sorts(values):
        return values.sort(dim=1)
    array = values.detach().numpy()
    order = np.argsort(array, axis=1)
    return torch.from_numpy(np.take_along_axis(array, order, axis=1)), torch.from_numpy(order)


def sorted_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row of ``values`` [B, m] sorted ascending (values only: cheaper than :func:`sort_rows` on the CPU)."""
    if not _numpy_sorts(values):
        return values.sort(dim=1).values
    return torch.from_numpy(np.sort(values.detach().numpy(), axis=1))
