"""Run logging: metrics as JSON lines in the run folder, and optionally Weights & Biases."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from knn_cm.io import atomic_path


class MetricsLog:
    """Appends one JSON object per call to ``<run>/metrics.jsonl`` (flushed, so a crash loses nothing)."""

    def __init__(self, run_dir: str | Path, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
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


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (a truncated last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class WandbLogger:
    """Weights & Biases logging that resumes the same run after a restart.

    The run id is stored in ``<run>/wandb_id.txt`` so a requeued job continues the same wandb run.
    ``mode`` "offline" (the default unless configured) writes locally under ``<run>/wandb``; sync later
    with ``wandb sync``. Only rank 0 logs.
    """

    def __init__(self, run_dir: str | Path, config: dict, project: str = "knn-cm", entity: str | None = None,
                 mode: str = "offline", name: str | None = None, tags: list | None = None):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, entity=entity, mode=mode, id=run_id, resume="allow",
                              dir=str(run_dir), config=config, name=name or run_dir.name, tags=tags)

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class NullLogger:
    """Logger that drops everything (``logger=none``)."""

    def log(self, record: dict) -> None:
        pass

    def log_image(self, key: str, path, step: int) -> None:
        pass

    def close(self) -> None:
        pass
