"""Ranks and devices at resume: one rank chooses among corrupt checkpoints, generator states of another device.

Two gloo ranks over a run folder whose newest checkpoint is corrupt must both resume from the previous one, with
the corrupt file moved aside once; a checkpoint whose generator states belong to another device (a CUDA state
stood in by a 16-byte ByteTensor) resumes with a warning and reseeded streams instead of crashing.
"""

from __future__ import annotations

import json
import logging
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
from tests.processes import free_port

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
    mp.spawn(_resume_worker, args=(2, free_port(), str(run_dir)), nprocs=2, join=True)
    results = [json.loads((tmp_path / "rendezvous" / f"result{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"resumed_from": "training-000000003.pt", "step": 3}] * 2
    assert sorted(p.name for p in run_dir.glob(f"checkpoints/*.pt{CORRUPT_SUFFIX}")) == [
        f"training-000000006.pt{CORRUPT_SUFFIX}"]
    assert not (tmp_path / "rendezvous" / "arrived1").exists(), "only rank 0 may verify and move checkpoints"


# ---------------------------------------------------------------------------- another device's generators
def _with_cuda_states(checkpoint: Path) -> None:
    """Rewrite ``checkpoint`` as a GPU run would have saved it: 16-byte generator states (seed, offset)."""
    state = checkpoints.load_checkpoint(checkpoint)
    for name in ("noise", "estimator"):
        state["generators"][0][name] = torch.arange(CUDA_STATE_BYTES, dtype=torch.uint8)
    state["generators"][0]["torch_cuda"] = torch.arange(CUDA_STATE_BYTES, dtype=torch.uint8)
    checkpoints.save_checkpoint(checkpoint, state)


def test_a_gpu_run_resumed_on_the_cpu_reseeds_its_streams_with_one_warning(tmp_path, store, caplog):
    """A CUDA generator state (16 bytes) was set into a CPU generator: ``RuntimeError`` at every such resume."""
    run_dir = tmp_path / "run"
    make_trainer(run_dir, store, stop_after_steps=3).fit()
    _with_cuda_states(list_checkpoints(run_dir)[-1])
    with caplog.at_level(logging.WARNING, logger="knn_cm.training.trainer"):
        resumed = make_trainer(run_dir, store)
    assert resumed.step == 3
    warnings = [r.getMessage() for r in caplog.records if "another device's generators" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert str(run_dir) in warnings[0]
    assert "noise (saved by a CUDA generator, now on cpu)" in warnings[0]
    assert "estimator (saved by a CUDA generator, now on cpu)" in warnings[0]
    fresh = make_trainer(tmp_path / "fresh", store)  # the streams restart from the seeds a new run starts with
    assert torch.equal(resumed.noise_generator.get_state(), fresh.noise_generator.get_state())
    assert torch.equal(resumed.estimator_generator.get_state(), fresh.estimator_generator.get_state())
    resumed.fit()  # and it trains on
    assert resumed.step == 6


class _CudaLikeGenerator:
    """Stands in for a CUDA generator: a 16-byte state, and ``set_state`` refuses any other size as CUDA does."""

    device = torch.device("cuda", 0)

    def __init__(self):
        self.state, self.seed = torch.zeros(CUDA_STATE_BYTES, dtype=torch.uint8), None

    def get_state(self):
        return self.state.clone()

    def set_state(self, state):
        if state.numel() != CUDA_STATE_BYTES:
            raise RuntimeError(f"RNG state is wrong size: {state.numel()}")
        self.state = state.clone()

    def manual_seed(self, seed):
        self.seed, self.state = seed, torch.full((CUDA_STATE_BYTES,), seed % 256, dtype=torch.uint8)
        return self


def test_a_cpu_state_offered_to_a_cuda_generator_reseeds_it_and_a_matching_state_is_restored():
    """The reverse move (a CPU run resumed on a GPU) through the same rule, with a generator that acts as CUDA's."""
    from knn_cm.training.trainer import generator_kind, restore_generator

    cpu_state = torch.Generator().manual_seed(5).get_state()
    cuda_like = _CudaLikeGenerator()
    assert not restore_generator(cuda_like, cpu_state, seed=7) and cuda_like.seed == 7
    assert generator_kind(cpu_state) == "a CPU generator"
    saved = torch.arange(CUDA_STATE_BYTES, dtype=torch.uint8)
    assert restore_generator(cuda_like, saved, seed=7) and torch.equal(cuda_like.get_state(), saved)
    cpu = torch.Generator().manual_seed(1)
    assert restore_generator(cpu, cpu_state, seed=9) and torch.equal(cpu.get_state(), cpu_state)


# ------------------------------------------------------------------------------------ gloo across nodes
NODES = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node001"}  # two nodes of eight ranks
ADDRESSES = {"node001": "10.0.0.1", socket.gethostname(): "127.0.1.1"}  # /etc/hosts maps the own name to loopback


def _choose(environ, addresses=ADDRESSES, interface="ib0"):
    from knn_cm.training.distributed import choose_gloo_interface

    return choose_gloo_interface(environ, resolve=addresses.get, interface_towards=lambda address: interface)


def test_a_hostname_on_loopback_in_a_multi_node_job_sets_the_gloo_interface(caplog):
    environ = dict(NODES)
    with caplog.at_level(logging.WARNING, logger="knn_cm.training.distributed"):
        assert _choose(environ) == "ib0"
    assert environ["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "resolves to 127.0.1.1 (loopback)" in caplog.text and "GLOO_SOCKET_IFNAME=ib0" in caplog.text


def test_without_an_interface_towards_the_master_it_says_what_to_set(caplog):
    environ = dict(NODES)
    with caplog.at_level(logging.WARNING, logger="knn_cm.training.distributed"):
        assert _choose(environ, interface=None) is None
    assert "GLOO_SOCKET_IFNAME" not in environ
    assert "set GLOO_SOCKET_IFNAME to the network interface that reaches MASTER_ADDR=node001" in caplog.text


@pytest.mark.parametrize("environ, addresses", [
    (NODES | {"GLOO_SOCKET_IFNAME": "eth1"}, ADDRESSES),  # the user's choice stays
    (NODES | {"LOCAL_WORLD_SIZE": "16"}, ADDRESSES),  # one node: loopback reaches every rank
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "node001"}, ADDRESSES),  # no LOCAL_WORLD_SIZE: one node (mp.spawn)
    (NODES, ADDRESSES | {"node001": "127.0.0.1"}),  # "nodes" that are all this host (tests, torchrun on loopback)
    (NODES, ADDRESSES | {socket.gethostname(): "10.0.0.2"}),  # the hostname resolves to the network
])
def test_the_gloo_interface_is_left_alone_where_loopback_does_no_harm(environ, addresses):
    before = dict(environ)
    assert _choose(environ, addresses) is None and environ == before


def test_the_interface_towards_an_address_is_one_of_this_hosts():
    from knn_cm.training.distributed import _interface_towards

    found = _interface_towards("10.255.255.1")  # None where no route leads there
    assert found is None or found in {name for _, name in socket.if_nameindex()}


@pytest.mark.parametrize("setting, expected", [(None, "knn-cm: gloo interface not set (a rank whose hostname "
                                                      "resolves to loopback picks the one that reaches node1)"),
                                               ("ib0", "knn-cm: gloo interface ib0")])
def test_train_sbatch_says_which_gloo_interface_a_multi_node_job_uses(tmp_path, setting, expected):
    from tests.e2e.test_elastic import _template_launch

    result = _template_launch(tmp_path, SLURM_NNODES="2", GLOO_SOCKET_IFNAME=setting or "")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout.splitlines()
