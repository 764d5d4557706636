"""JSON-lines logs of a run folder (metrics, evaluations, invocations): append-only, crash-tolerant."""

from __future__ import annotations

import json
from pathlib import Path

from knn_cm.io import atomic_path


class JsonLinesLog:
    """Appends one JSON object per call to a ``.jsonl`` file (flushed, so a crash loses nothing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> int:
        """Remove the records of steps after ``step`` (and lines cut short by a kill); returns how many.

        Called on resume from a checkpoint at ``step``: the steps after it are trained again and logged again,
        so the log never holds a step twice.
        """
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (recorded := _record_step(line)) is not None and recorded <= step]
        if len(kept) != len(lines):
            with atomic_path(self.path) as temp:
                temp.write_text("".join(line + "\n" for line in kept))
        return len(lines) - len(kept)


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_json_lines(path: str | Path) -> list[dict]:
    """Records of a ``.jsonl`` file; a truncated last line from a crash is skipped; [] when there is no file."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
