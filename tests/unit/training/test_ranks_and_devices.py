"""Ranks and devices at resume: one rank chooses among corrupt checkpoints, generator states of another device.

Two gloo ranks over a run folder whose newest checkpoint is corrupt must both resume from the previous one, with
the corrupt file moved aside once; a checkpoint whose generator states belong to another device (a CUDA state
stood in by a 16-byte ByteTensor) resumes with a warning and reseeded streams instead of crashing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import knn_cm.runs.checkpoints as checkpoints
from knn_cm.data import DataStore
from knn_cm.estimators import make_estimator
from knn_cm.runs.checkpoints import CORRUPT_SUFFIX, digest_path, list_checkpoints, move_aside
from knn_cm.training import EMA, ICTObjective, Trainer, TrainerConfig
from knn_cm.training.distributed import DistributedContext

ROOT = Path(__file__).resolve().parents[3]
IMAGES = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
CUDA_STATE_BYTES = 16  # a CUDA (Philox) generator's state: seed and offset


def tiny_network():
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        config = compose("train", overrides=["dataset=digits", "model=ncsnpp_tiny"])
    torch.manual_seed(0)  # identical initial weights on every rank, as train.py does
    return instantiate(config.model)


def make_trainer(run_dir, store, context=None, estimator_device="cpu", **settings) -> Trainer:
    config = TrainerConfig(**({"max_steps": 6, "batch_size": 8, "progress": False, "num_sample_images": 0,
                               "device": "cpu", "checkpoint_every": 3, "log_every": 1} | settings))
    objective = ICTObjective(make_estimator("single", store), total_steps=6)
    return Trainer(config, run_dir, store, tiny_network(), objective,
                   lambda params: torch.optim.RAdam(params, lr=1e-3), ema_factory=lambda m: EMA(m, decay=0.9),
                   context=context, estimator_device=estimator_device)


@pytest.fixture(scope="module")
def store() -> DataStore:
    return DataStore.from_array(IMAGES, name="ranks_and_devices")


# ------------------------------------------------------------------------------ a corrupt newest checkpoint
def test_moving_aside_a_checkpoint_another_process_moved_is_no_error(tmp_path):
    path = tmp_path / "training-000000006.pt"
    path.write_bytes(b"broken")
    digest_path(path).write_text("{}\n")
    first = move_aside(path)
    assert move_aside(path) == first  # the second process finds nothing left to move
    assert first.read_bytes() == b"broken" and Path(f"{digest_path(path)}{CORRUPT_SUFFIX}").is_file()
    assert not path.exists() and not digest_path(path).exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _meet_before_moving(rank: int, folder: Path, wait_seconds: float = 5.0):
    """``move_aside`` that lets every rank which reaches it arrive first, then moves in rank order.

    This is the interleaving in which two ranks both found the file corrupt; a rank that reaches it alone moves
    after ``wait_seconds``.
    """
    original = checkpoints.move_aside

    def wait_for(name: str) -> bool:
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if (folder / name).exists():
                return True
            time.sleep(0.02)
        return False

    def met(path):
        (folder / f"arrived{rank}").touch()
        if wait_for(f"arrived{1 - rank}") and rank == 1:
            wait_for("moved0")
        try:
            return original(path)
        finally:
            (folder / f"moved{rank}").touch()

    return met


def _resume_worker(rank: int, world: int, port: int, run_dir: str):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    rendezvous = Path(run_dir).parent / "rendezvous"
    checkpoints.move_aside = _meet_before_moving(rank, rendezvous)
    context = DistributedContext.from_env("cpu", timeout_minutes=1)
    try:
        trainer = make_trainer(run_dir, DataStore.from_array(IMAGES, name="ranks_and_devices"), context=context)
        result = {"resumed_from": trainer.resumed_from.name, "step": trainer.step}
        context.barrier()
    finally:
        context.close()
    (rendezvous / f"result{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_ranks_resume_from_the_checkpoint_before_a_corrupt_newest_one(tmp_path, store):
    """Every rank ran ``load_latest_intact``; two that both found the newest file corrupt raced to move it aside
    and the later one crashed with FileNotFoundError. Rank 0 now chooses and the other rank loads its choice."""
    run_dir = tmp_path / "run"
    make_trainer(run_dir, store).fit()
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == "training-000000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by a crash mid-copy
    (tmp_path / "rendezvous").mkdir()
    mp.spawn(_resume_worker, args=(2, _free_port(), str(run_dir)), nprocs=2, join=True)
    results = [json.loads((tmp_path / "rendezvous" / f"result{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"resumed_from": "training-000000003.pt", "step": 3}] * 2
    assert sorted(p.name for p in run_dir.glob(f"checkpoints/*.pt{CORRUPT_SUFFIX}")) == [
        f"training-000000006.pt{CORRUPT_SUFFIX}"]
    assert not (tmp_path / "rendezvous" / "arrived1").exists(), "only rank 0 may verify and move checkpoints"
