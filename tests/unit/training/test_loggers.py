"""Training loggers: an offline wandb run says where it is and how to upload it."""

from __future__ import annotations

import glob
import logging

import pytest

from knn_cm.training.loggers import WandbLogger


def _start(run_dir, caplog) -> list[str]:
    """One invocation's logger (started, one record logged, closed); the wandb lines it logged."""
    caplog.clear()
    logger = WandbLogger(run_dir, {"seed": 0}, mode="offline", name="quickstart")
    try:
        logger.log({"step": 1, "loss": 0.5})
    finally:
        logger.close()
    return [record.getMessage() for record in caplog.records if "wandb" in record.getMessage()]


def test_offline_wandb_says_where_the_run_is_and_the_sync_command_once(tmp_path, monkeypatch, caplog):
    """Each invocation says once where it logs and the `wandb sync` command; the command's glob covers the
    folders of every invocation of the run (a restarted job logs into a second offline folder)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    caplog.set_level(logging.INFO, logger="knn_cm.training.loggers")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = _start(run_dir, caplog)
    run_id = (run_dir / "wandb_id.txt").read_text()
    (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    sync = f"wandb sync {run_dir / 'wandb'}/offline-run-*-{run_id}"
    assert first == [f"wandb (offline): run {run_id} logs into {offline_run}; upload this run (every invocation) "
                     f"with: {sync}"]
    second = _start(run_dir, caplog)  # the relaunched job: the same run id, another offline folder
    assert len(second) == 1 and second[0].endswith(sync)
    assert len(glob.glob(sync.removeprefix("wandb sync "))) == 2
