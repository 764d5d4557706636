"""The objectives where GPU runs meet them: under DDP with every parameter reached, and called outside the Trainer
with a device's generator.

A CPU has no CUDA generator; what CUDA refuses is a random draw whose generator lives on another device than the
tensor drawn ("Expected a 'cuda' device type for generator"). The draws here are checked the same way, with the
meta device's generator standing in for the GPU's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from knn_cm.cli import compose_app
from knn_cm.data import DataStore
from knn_cm.estimators import make_estimator
from knn_cm.host_syncs import HostSyncCounter
from knn_cm.training import EDMObjective, ICTObjective, StepRandom, Trainer, TrainerConfig
from knn_cm.training.augment import EDM_CIFAR10
from knn_cm.training.distributed import DistributedContext
from tests.processes import free_port

META = torch.device("meta")


def tiny_network(kind: str, *overrides: str):
    from hydra.utils import instantiate

    config = compose_app("train", ["dataset=digits", f"model={kind}", "run_name=objectives", *overrides])
    torch.manual_seed(0)
    return instantiate(config.model)


# ------------------------------------------------------------------------------------------------- DDP


def _edm_without_augmentation_worker(rank: int, world: int, port: int, run_dir: str, images: np.ndarray):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    context = DistributedContext.from_env("cpu")
    try:
        store = DataStore.from_array(images, name="ddp_augment_dim")
        config = TrainerConfig(max_steps=2, batch_size=8, progress=False, num_sample_images=0, device="cpu",
                               checkpoint_every=100, log_every=1)
        trainer = Trainer(config, Path(run_dir) / "run", store,
                          tiny_network("ddpmpp_tiny", "model.network.augment_dim=9"),
                          EDMObjective(make_estimator("single", store)),
                          lambda params: torch.optim.Adam(params, lr=1e-3), context=context)
        record = trainer.fit()
        torch.save({"step": trainer.step, "loss": record["loss"],
                    "map_augment": trainer.model.model.map_augment.weight.detach().clone()},
                   Path(run_dir) / f"rank{rank}.pt")
    finally:
        context.close()


@pytest.mark.slow
def test_edm_without_augmentation_trains_a_network_with_augment_dim_under_ddp(tmp_path):
    """A network with augment_dim > 0 trained without the pipe (experiment=edm trainer.objective.augment=null):
    its augmentation weights got no gradient and DDP raised "Expected to have finished reduction" on every rank.
    Zero labels ("not augmented") reach them now, as the pipe's unaugmented images do."""
    images = np.random.default_rng(2).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    mp.spawn(_edm_without_augmentation_worker, args=(2, free_port(), str(tmp_path), images), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [state["step"] for state in ranks] == [2, 2]
    assert all(np.isfinite(state["loss"]) for state in ranks)
    assert torch.equal(ranks[0]["map_augment"], ranks[1]["map_augment"])  # zero gradient, identical on both ranks


def test_zero_augmentation_labels_leave_the_network_output_unchanged():
    """The zero labels add nothing (map_augment has no bias), so a single process trains exactly as before."""
    network = tiny_network("ddpmpp_tiny", "model.network.augment_dim=9").eval()
    z, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 2.0, 10.0])
    labels = EDMObjective._unaugmented_labels(network, 3, z.device)
    assert labels["augment_labels"].shape == (3, 9)
    with torch.no_grad():
        assert torch.equal(network(z, sigma, **labels), network(z, sigma))
    assert EDMObjective._unaugmented_labels(tiny_network("ddpmpp_tiny"), 3, z.device) == {}


# ------------------------------------------------------------------------------------------- generators
def _strict(draw):
    """``draw`` (torch.rand, randn, randint) refusing a generator of another device, as CUDA's does."""

    def checked(*args, generator=None, device=None, **kwargs):
        wanted = torch.device(device if device is not None else "cpu")
        if generator is not None and generator.device.type != wanted.type:
            raise RuntimeError(f"Expected a '{wanted.type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return draw(*args, generator=generator, device=device, **kwargs)

    return checked


@pytest.fixture
def strict_draws(monkeypatch):
    for name in ("rand", "randn", "randint"):
        monkeypatch.setattr(torch, name, _strict(getattr(torch, name)))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("objective", ["ict", "edm_augmented"])
def test_objectives_called_alone_take_the_generator_of_the_device_they_run_on(strict_draws, objective):
    """Outside the Trainer, iCT drew its dropout seed and EDM's pipe its parameters on the CPU from the caller's
    device generator: refused on CUDA. Now the step's seed travels with the generators (StepRandom): host draws
    seed from it and device draws use the generator of their own device."""
    store = DataStore.from_array(np.random.default_rng(3).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
    if objective == "ict":
        network = tiny_network("ncsnpp_tiny").to(META)
        loss_of = ICTObjective(make_estimator("single", store, device=META), total_steps=10)
    else:
        network = tiny_network("ddpmpp_tiny", "model.network.augment_dim=9").to(META)
        loss_of = EDMObjective(make_estimator("single", store, device=META), augment=EDM_CIFAR10)
    with HostSyncCounter():  # keeps the meta program going where a value is read
        loss, _ = loss_of(network, torch.zeros(4, 1, 8, 8, device=META), 0, StepRandom.seeded(0, META))
    assert loss.shape == () and loss.device == META
