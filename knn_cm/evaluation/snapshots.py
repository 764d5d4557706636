"""Finding the networks a run folder holds: EMA snapshots written by the trainer."""

from __future__ import annotations

import re
from pathlib import Path

SNAPSHOT_PATTERN = re.compile(r"network-(\d{9})\.pt$")


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(training step, path) of every EMA network snapshot in ``<run>/snapshots``, oldest first."""
    folder = Path(run_dir) / "snapshots"
    found = [(int(m.group(1)), p) for p in folder.glob("network-*.pt") if (m := SNAPSHOT_PATTERN.search(p.name))]
    return sorted(found)


def resolve_network_path(path: str | Path) -> Path:
    """A network file itself, or the newest snapshot of a run folder; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        snapshots = list_snapshots(path)
        if not snapshots:
            raise FileNotFoundError(f"run folder {path} has no snapshots/network-*.pt; pass a network file instead")
        return snapshots[-1][1]
    if not path.is_file():
        raise FileNotFoundError(f"network {path} does not exist (expected a network file or a run folder)")
    return path
