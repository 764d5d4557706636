"""The non-finite guard: NaN or inf in a loss, gradients or weights stops a run before anything is written.

A training step never reads its loss back (that would stall a GPU's queue); :class:`NonFiniteFlag` records the
first bad step on the device, and the trainer reads it where a step's results would be logged or written.
"""

from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights became NaN or inf; the run stopped without writing them."""


class NonFiniteFlag:
    """The first step whose loss or gradients were not finite, kept on the device until read.

    ``update`` queues a few kernels and never reads back; ``read`` is the one host read (at log and output steps).
    """

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, step: int, loss: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """Flag ``step`` when ``loss`` (0-d) or any gradient has a NaN or inf (and no earlier step was flagged)."""
        finite = torch.isfinite(loss)
        if grads:
            # Max-norms in a few fused launches: finite exactly when every entry is (no overflow, NaN propagates).
            norms = torch._foreach_norm(grads, float("inf"))
            finite = finite & torch.isfinite(torch.stack(norms)).all()
        first = (~finite) & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.loss = torch.where(first, loss, self.loss)

    def read(self) -> tuple[int, float] | None:
        """(first bad step, its loss) or None; clears nothing (a run stops at the first report)."""
        first_step = int(self.first_step)
        return None if first_step < 0 else (first_step, float(self.loss))


def all_finite(tensors) -> bool:
    """True when every entry of every tensor is finite (one reduction per tensor, one host sync in all)."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return True
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return bool(flags.all())
