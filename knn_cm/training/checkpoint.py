"""Training checkpoints: the whole state needed to continue a run bit for bit, written atomically.

A checkpoint holds the network, its EMA, the optimizer (and fp16 grad scaler), the step and images seen
(the curriculum and data order follow from them), every random generator's state and the run's
metadata. Files are ``<run>/checkpoints/training-<step>.pt``; they load with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from knn_cm.io import atomic_path

CHECKPOINT_PATTERN = re.compile(r"training-(\d{9})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"training-{step:09d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Training checkpoints of a run folder, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("training-*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(path: str | Path, state: dict, keep: int | None = None) -> Path:
    """Write ``state`` to ``path`` atomically; then keep only the newest ``keep`` checkpoints beside it."""
    path = Path(path)
    with atomic_path(path) as temp:
        torch.save(state, temp)
    if keep is not None and keep > 0:
        for old in list_checkpoints(path.parent.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a training checkpoint (``weights_only=True``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    missing = {"model", "ema", "optimizer", "step", "images_seen", "generators"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (missing {sorted(missing)})")
    return state
