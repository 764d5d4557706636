"""What the CUDA and multi-rank training path needs, shown on the CPU.

A CPU cannot run CUDA, but it can run the same logic: a resume onto a device whose tensors are not CPU tensors
(``meta``), dropout masks of two gloo DDP ranks, and the trainer's device setting.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from knn_cm.data import DataStore
from knn_cm.estimators import make_estimator
from knn_cm.training import EMA, EDMObjective, ICTObjective, Trainer, TrainerConfig
from knn_cm.training.distributed import DistributedContext
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def store() -> DataStore:
    images = np.random.default_rng(0).integers(0, 256, (256, 1, 8, 8), dtype=np.uint8)
    return DataStore.from_array(images, name="gpu_path")


def tiny_network(kind: str = "ncsnpp_tiny", dropout: float = 0.0, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        config = compose("train", overrides=["dataset=digits", f"model={kind}", f"model.network.dropout={dropout}",
                                             *overrides])
    torch.manual_seed(0)
    return instantiate(config.model)


def make_trainer(run_dir, store, objective, context=None, network=None, **settings) -> Trainer:
    config = TrainerConfig(**({"max_steps": 6, "batch_size": 8, "progress": False, "num_sample_images": 0,
                               "device": "cpu", "checkpoint_every": 3, "log_every": 1} | settings))
    return Trainer(config, run_dir, store, network or tiny_network(), objective,
                   lambda params: torch.optim.RAdam(params, lr=1e-3), ema_factory=lambda m: EMA(m, decay=0.9),
                   context=context)


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_a_resume_onto_a_non_cpu_device_restores_the_generators(tmp_path, store):
    """Item 1: every CUDA resume crashed (generator states mapped to the GPU are refused by ``set_state``).

    The ``meta`` device stands in for CUDA: its tensors are not CPU tensors, so the old
    ``map_location=self.device`` raised the same ``TypeError: RNG state must be a torch.ByteTensor``.
    """
    objective = ICTObjective(make_estimator("single", store), total_steps=6)
    first = make_trainer(tmp_path, store, objective, stop_after_steps=3)
    first.fit()
    saved = first._generator_states()
    on_meta = DistributedContext(device=torch.device("meta"))
    resumed = make_trainer(tmp_path, store, objective, context=on_meta, device="auto")
    assert resumed.step == 3 and resumed.start_step == 3
    assert resumed.resumed_from.name == "training-000000003.pt"
    assert all(p.device.type == "meta" for p in resumed.model.parameters())
    assert torch.equal(resumed.noise_generator.get_state(), saved["noise"])
    assert torch.equal(resumed.estimator_generator.get_state(), saved["estimator"])


def test_the_trainer_trains_where_trainer_device_says(tmp_path, store):
    """Item 3's cause: ``TrainerConfig.device`` was never read; now a context on another device is refused."""
    objective = ICTObjective(make_estimator("single", store), total_steps=6)
    assert make_trainer(tmp_path / "a", store, objective).device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"trainer.device=cuda but the process's device is meta"):
        make_trainer(tmp_path / "b", store, objective, device="cuda",
                     context=DistributedContext(device=torch.device("meta")))


# Host reads of a training step: tests/unit/training/test_host_syncs.py counts them at the dispatcher.


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_updates_in_fused_kernels_and_equals_the_per_parameter_update(monkeypatch):
    """Item 10: one fused lerp over the whole network, bit-identical to a lerp per parameter."""
    network = tiny_network()
    ema = EMA(network, decay=0.9)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter))
    expected = [e.detach().clone().lerp_(p.detach(), 0.1) for e, p in zip(ema.model.parameters(),
                                                                          network.parameters())]
    calls = []
    fused = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *args: calls.append(len(args[0])) or fused(*args))
    ema.update(network, step=0, images_seen=0, batch_size=8)
    assert calls == [len(expected)]
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), expected))


# ------------------------------------------------------------------------------------- DDP dropout


def _edm_dropout_worker(rank: int, world: int, port: int, run_dir: str, images: np.ndarray):
    """Two steps of EDM with dropout 0.3 on a gloo DDP rank; records a digest of every dropout draw."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import knn_cm.models.blocks as blocks

    draws = []
    original = blocks.apply_dropout

    def recorded(h, p, training):
        out = original(h, p=p, training=training)
        dropped = (out == 0).flatten().double()
        draws.append(float((dropped * torch.arange(dropped.numel(), dtype=torch.float64)).sum()))  # which units
        return out

    blocks.apply_dropout = recorded
    context = DistributedContext.from_env("cpu")
    try:
        store = DataStore.from_array(images, name="ddp_dropout")
        config = TrainerConfig(max_steps=2, batch_size=8, progress=False, num_sample_images=0, device="cpu",
                               checkpoint_every=100, log_every=1)
        torch.manual_seed(0)  # identical initial weights on both ranks, as train.py does
        trainer = Trainer(config, Path(run_dir) / "run", store, tiny_network("ddpmpp_tiny", dropout=0.3),
                          EDMObjective(make_estimator("single", store)),
                          lambda params: torch.optim.Adam(params, lr=1e-3), context=context)
        trainer.fit()
    finally:
        context.close()
    torch.save(draws, Path(run_dir) / f"draws{rank}.pt")


def _dropout_draws(folder: Path, images) -> tuple[list, list]:
    mp.spawn(_edm_dropout_worker, args=(2, free_port(), str(folder), images), nprocs=2, join=True)
    return torch.load(folder / "draws0.pt"), torch.load(folder / "draws1.pt")


@pytest.mark.slow
def test_edm_ranks_draw_different_dropout_masks_and_a_rerun_draws_the_same(tmp_path):
    """Item 2: every rank seeded the global RNG alike, so EDM's dropout dropped the same units on all ranks."""
    images = np.random.default_rng(1).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    rank0, rank1 = _dropout_draws(tmp_path / "first", images)
    assert len(rank0) == len(rank1) > 0
    assert all(a != b for a, b in zip(rank0, rank1)), "the two ranks drew the same dropout masks"
    again0, again1 = _dropout_draws(tmp_path / "second", images)
    assert (again0, again1) == (rank0, rank1), "a rerun must draw the same masks"
