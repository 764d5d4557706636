"""Device parsing shared by indexes and estimators."""

from __future__ import annotations

import torch


def as_device(device, what: str = "device") -> torch.device:
    """``device`` as a torch.device; a ValueError naming it unless it is cpu or an available CUDA device.

    ``"auto"`` picks CUDA when available, else the CPU.
    """
    if device == "auto":
        return concrete_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what} must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be 'auto', 'cpu' or 'cuda[:i]', got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device} requested but CUDA is not available; use 'cpu'")
    return concrete_device(device)


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with a bare "cuda" made the current CUDA device, "cuda:N"; any other device as it is.

    The current device is the one ``torch.cuda.set_device`` chose for this process (the trainer sets each
    rank's): so "cuda" means this rank's GPU wherever a device number is needed (faiss-gpu), and "cuda" and
    "cuda:N" name one cache entry (a store's resident rows).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
