"""Deterministic training order: an endless stream of per-epoch permutations of the dataset.

Position p of the stream is element perm_e[p mod N] of epoch e = p // N, where perm_e is drawn from a
generator seeded with (seed, e). A training step only needs its stream position (images seen), so a
resumed run continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch


class BatchStream:
    """Element indices for stream positions [start, start + count) of a dataset of ``size`` elements."""

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"the dataset is empty (size {size})")
        self.size, self.seed = size, seed
        self._epoch, self._permutation = -1, None

    def _permutation_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.size, generator=generator)
        return self._permutation

    def indices(self, start: int, count: int) -> torch.Tensor:
        """int64 [count] element indices at stream positions start, ..., start + count - 1."""
        out = torch.empty(count, dtype=torch.long)
        filled = 0
        while filled < count:
            position = start + filled
            epoch, offset = divmod(position, self.size)
            take = min(count - filled, self.size - offset)
            out[filled : filled + take] = self._permutation_of(epoch)[offset : offset + take]
            filled += take
        return out
