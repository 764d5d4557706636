"""Training state across invocations: the refusal to start over a run, and seeds that need no saved state."""

from __future__ import annotations

from pathlib import Path

from knn_cm.runs.checkpoints import list_checkpoints


def refuse_restart_over_checkpoints(run_dir: str | Path, resume: str) -> None:
    """trainer.resume=never on a folder with checkpoints would mix two runs' checkpoints: refuse it."""
    existing = list_checkpoints(run_dir)
    if resume == "never" and existing:
        raise ValueError(f"trainer.resume=never, but run folder {run_dir} already has checkpoints (newest "
                         f"{existing[-1].name}); nothing was overwritten. Start the new run in its own folder "
                         f"(run_name=NEW_NAME), or continue this one with trainer.resume=auto")


def splitmix64(value: int) -> int:
    """SplitMix64's mixing function (Steele et al. 2014): a well-spread 64-bit hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)
