"""Training loggers beside the run folder's metrics.jsonl (knn_cm.runs.jsonl): Weights & Biases, or none."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


class WandbLogger:
    """Weights & Biases logging that resumes the same run after a restart.

    The run id is stored in ``<run>/wandb_id.txt`` so a requeued job continues the same wandb run.
    ``mode`` "offline" (the default unless configured) writes locally under ``<run>/wandb``, one
    ``offline-run-<time>-<id>`` folder per invocation, and says so once when it starts, with the
    ``wandb sync`` command that uploads every invocation of the run. Only rank 0 logs (the apps make the
    logger there only).
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
        if mode == "offline":
            log.info(offline_message(Path(self.run.dir).parent, run_id))

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def offline_message(offline_run: Path, run_id: str) -> str:
    """Where an offline wandb run is and how to upload it: every invocation's ``offline-run-*-<id>`` folder
    beside ``offline_run`` belongs to the same wandb run, so one ``wandb sync`` of the glob sends them all."""
    offline_run = offline_run.resolve()
    return (f"wandb (offline): run {run_id} logs into {offline_run}; upload this run (every invocation) with: "
            f"wandb sync {offline_run.parent}/offline-run-*-{run_id}")


class NullLogger:
    """Logger that drops everything (``logger=none``)."""

    def log(self, record: dict) -> None:
        pass

    def log_image(self, key: str, path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(logger, run_dir, config: dict):
    """``logger`` (an instantiated ``logger`` config) ready to log: itself, or, when it is a partial that needs the
    run folder (wandb), its call with the folder and the resolved config."""
    if callable(logger) and not hasattr(logger, "log"):
        return logger(run_dir=run_dir, config=config)
    return logger
