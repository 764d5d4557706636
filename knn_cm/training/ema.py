"""Exponential moving average of a network's weights, kept for evaluation and sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_KINDS = ("constant", "halflife")


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every optimizer step.

    Two schedules for the decay d:
    - "constant" (iCT: 0.99993 from step 0, Table 3). With ``warmup`` (off by default):
      d_k = min(decay, (1 + k) / (10 + k)) so short runs are not dominated by the initial weights
      (docs/hyperparameters.md, "Short runs on a CPU": a fixed 0.999 is useless over a few thousand steps);
      it reaches 0.99993 only at k = 128,562.
    - "halflife" (EDM): d = 0.5^(batch / h) with half-life h = halflife_images, ramped up as
      h = min(h, rampup_ratio * images_seen) (EDM: 0.5 Mimg, ratio 0.05).

    Args:
        model: the trained network (unwrapped); the EMA copy is made from it once.
    """

    def __init__(self, model: nn.Module, kind: str = "constant", decay: float = 0.99993, warmup: bool = False,
                 halflife_images: float = 500_000.0, rampup_ratio: float | None = 0.05):
        if kind not in EMA_KINDS:
            raise ValueError(f"unknown EMA kind {kind!r}; allowed: {', '.join(EMA_KINDS)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.kind, self.decay, self.warmup = kind, decay, warmup
        self.halflife_images, self.rampup_ratio = halflife_images, rampup_ratio
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int, images_seen: int, batch_size: int) -> float:
        """The decay used after optimizer step ``step`` (0-based), having seen ``images_seen`` images."""
        if self.kind == "constant":
            return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, images_seen: int, batch_size: int) -> float:
        """Move the EMA towards ``model``'s weights; buffers are copied. Returns the decay used."""
        decay = self.decay_at(step, images_seen, batch_size)
        # Fused multi-tensor kernels: a few launches for the whole network instead of one per parameter.
        ema_params = list(self.model.parameters())
        if ema_params:
            torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
        ema_buffers = list(self.model.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, list(model.buffers()))
        return decay

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
