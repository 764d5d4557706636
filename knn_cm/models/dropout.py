"""Dropout whose random masks can be replayed: iCT's student and teacher passes share them.

iCT (Song & Dhariwal 2024) evaluates the student f(z_{i+1}, sigma_{i+1}) and the teacher
stopgrad f(z_i, sigma_i) with the *same* dropout masks. The mechanism here:

    seed = draw_dropout_seed()                    # one draw from the caller's global RNG
    with shared_dropout(seed):
        student = denoiser(z_next, sigma_next)
    with torch.no_grad(), shared_dropout(seed):
        teacher = denoiser(z, sigma)

Inside ``shared_dropout(seed)`` every dropout mask (and the label-dropout mask of SongUNet) is drawn
from private ``torch.Generator`` objects, one per device, created fresh and seeded with ``seed`` when
the context is entered. Two passes that run the same network on the same shapes under the same seed
therefore draw identical masks, on any device. The caller's global RNG stream is neither read nor
advanced inside the context, so code after it sees exactly the random numbers it would have seen
without the forward passes' dropout. Outside any context, dropout uses the global RNG as usual.

The state lives in a ``contextvars.ContextVar``: contexts nest (the inner one wins) and are private to
their thread. Under data parallelism give each rank a different seed (e.g. draw it from a per-rank
seeded generator) unless identical masks across ranks are wanted.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from knn_cm.device import concrete_device, draw_seed, new_generator


class _SharedDropoutState:
    """Per-device generators seeded with one seed, created on first use inside one context."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        device = concrete_device(device)
        if device not in self._generators:
            self._generators[device] = new_generator(device, self.seed)
        return self._generators[device]


_ACTIVE_STATE: contextvars.ContextVar[_SharedDropoutState | None] = contextvars.ContextVar(
    "knn_cm_shared_dropout", default=None
)


@contextlib.contextmanager
def shared_dropout(seed: int) -> Iterator[None]:
    """Draw all dropout masks inside the block from fresh generators seeded with ``seed``.

    Two blocks entered with the same seed replay the same sequence of masks. See the module docstring.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"shared_dropout: seed={seed!r} must be an int")
    if not 0 <= seed < 2**64:
        raise ValueError(f"shared_dropout: seed={seed} must lie in [0, 2**64)")
    token = _ACTIVE_STATE.set(_SharedDropoutState(seed))
    try:
        yield
    finally:
        _ACTIVE_STATE.reset(token)


def shared_dropout_active() -> bool:
    """True inside a ``shared_dropout`` block."""
    return _ACTIVE_STATE.get() is not None


def draw_dropout_seed(generator: torch.Generator | None = None) -> int:
    """One seed for ``shared_dropout``, drawn from ``generator`` on its device (default: the global CPU RNG)."""
    return draw_seed(generator)


def uniform_noise(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) noise of ``shape``: from the shared generator inside ``shared_dropout``, else global RNG."""
    state = _ACTIVE_STATE.get()
    if state is None:
        return torch.rand(*shape, device=device, dtype=dtype)
    return torch.rand(*shape, device=device, dtype=dtype, generator=state.generator(device))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale survivors by 1/(1-p).

    x: any shape. Identity when not training or p = 0. Masks come from the shared generator inside
    ``shared_dropout`` (see module docstring), else from the global RNG (``F.dropout``).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p={p} must lie in [0, 1]")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    if _ACTIVE_STATE.get() is None:
        return F.dropout(x, p=p, training=True)
    keep = uniform_noise(x.shape, x.device) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
