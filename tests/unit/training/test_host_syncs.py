"""Host synchronisations of a training step, counted at the dispatcher on the ``meta`` device (a stand-in for CUDA).

:class:`knn_cm.host_syncs.HostSyncCounter` flags every operation that would make the host wait for a GPU:
device reads (also those made inside C++), value-shaped outputs (``nonzero``, boolean masks), copies to the host
and blocking copies from it. The step runs on ``meta``, which takes the accelerator's code paths (the device's
own generators, pinned non-blocking batch copies, the estimators' fixed-shape path), so each paper experiment's
objective and estimator is counted as it would run on a GPU, at its configured settings, with a tiny network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from knn_cm.cli import compose_app
from knn_cm.device import new_generator
from knn_cm.estimators import build_estimator
from knn_cm.host_syncs import HostSyncCounter
from knn_cm.training import EMA, Trainer
from knn_cm.training.checks import check_settings, estimator_spec
from knn_cm.training.distributed import DistributedContext

META = torch.device("meta")
# Every training experiment of the paper (Tables 1-2, Figure 4) and flow matching beside it.
EXPERIMENTS = ["ict", "ict_knn", "ict_stf", "edm", "edm_stf", "edm_knn", "figure4_baseline", "figure4_k",
               "figure4_n", "fm", "fm_knn", "fm_stf", "quickstart", "digits_edm"]
STEPS = 4


def compose_experiment(name: str, *overrides: str):
    return compose_app("train", [f"experiment={name}", "debug=default", "run_name=host_syncs", *overrides])


def meta_trainer(config, run_dir: Path) -> Trainer:
    """train.py's construction of the experiment (its objective, estimator, optimizer, EMA), on the meta device.

    Building reads values (row norms, index statistics); the counter keeps that going on meta, uncounted.
    """
    with HostSyncCounter():
        return _meta_trainer(config, run_dir)


def _meta_trainer(config, run_dir: Path) -> Trainer:
    settings = check_settings(config)
    store = instantiate(config.dataset.store)
    estimator = build_estimator(estimator_spec(config), store, META, index_setting="index")
    torch.manual_seed(0)
    denoiser = instantiate(config.model)
    objective = instantiate(config.trainer.objective)(estimator=estimator)
    ema = OmegaConf.to_container(config.trainer.ema, resolve=True)
    settings.max_steps, settings.checkpoint_every, settings.log_every = STEPS, STEPS, STEPS
    settings.device = "auto"
    return Trainer(settings, run_dir, store, denoiser, objective, instantiate(config.trainer.optimizer),
                   ema_factory=lambda model: EMA(model, **ema), context=DistributedContext(device=META),
                   estimator_device=estimator.device)


def syncs_per_step(trainer: Trainer, monkeypatch) -> tuple[list[int], HostSyncCounter]:
    """Syncs of each plain step (neither logging nor checkpointing) after the first, which warms up."""
    # No CUDA here to pin host memory: the trainer's pinned copy is the non-blocking copy it issues after it.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args, **kwargs: tensor)
    counts = []
    with HostSyncCounter() as counter:
        for _ in range(STEPS - 1):
            start = counter.count
            trainer.train_step()
            counts.append(counter.count - start)
    return counts[1:], counter


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_a_plain_training_step_of_every_paper_experiment_makes_the_host_wait_for_nothing(tmp_path, monkeypatch,
                                                                                          experiment):
    config = compose_experiment(experiment, "trainer.max_steps=400000")  # the curriculum's pace of a real run
    trainer = meta_trainer(config, tmp_path / "run")
    counts, counter = syncs_per_step(trainer, monkeypatch)
    assert counts == [0] * (STEPS - 2), counter.summary()


# ----------------------------------------------------------------------------------------- the counter itself
def test_the_counter_sees_what_python_level_patches_missed():
    """Reads inside C++ and value-shaped outputs pass a counter that patches Tensor methods; this one sees them."""
    values = torch.ones(4, device=META)
    host = torch.ones(4)
    with HostSyncCounter() as counter:
        values.nonzero()                                   # value-shaped output
        values[values > 0]                                 # boolean-mask indexing
        torch.repeat_interleave(values.long())             # no output_size
        host.to(META)                                      # a blocking (pageable) copy to the device
        host.to(META, non_blocking=True)                   # not counted: the trainer pins before it
        values.cpu()                                       # to the host
        float(values.sum())                                # a read
        host.sum().item()                                  # not counted: a host tensor
        torch.equal(values, values)
    kinds = [(sync.kind, sync.operation) for sync in counter.syncs]
    assert kinds == [("value-shaped", "nonzero"), ("value-shaped", "index"), ("value-shaped", "repeat_interleave"),
                     ("blocking-copy", "_to_copy"), ("to-host", "_to_copy"), ("read", "_local_scalar_dense"),
                     ("value-shaped", "equal")], kinds
    assert all("test_host_syncs.py" in sync.where for sync in counter.syncs), counter.summary()


def test_the_counter_keeps_a_meta_program_going_with_zero_values():
    values = torch.ones(3, device=META)
    with HostSyncCounter():
        assert bool(values.sum() > 0) is False
        assert values.nonzero().shape == (0, 1)
        assert values[values > 0].shape == (0,)
        assert torch.equal(values.cpu(), torch.zeros(3))


# ------------------------------------------------------------------------------------ the named exception
def test_a_cpu_faiss_index_under_an_accelerator_is_the_named_exception_and_says_so(caplog):
    """A faiss index on the CPU (IVF, approximate) searched for an estimator on a device copies the queries to the
    host and the neighbours back on every call: counted, and warned about where the index is chosen."""
    config = compose_experiment("quickstart", "index=ivf")
    store = instantiate(config.dataset.store)
    with HostSyncCounter(), caplog.at_level("WARNING"):
        estimator = build_estimator(estimator_spec(config), store, META, index_setting="index")
    assert "searches on the CPU for an estimator on meta" in caplog.text
    queries = torch.zeros(4, *store.shape, device=META)
    with HostSyncCounter() as counter:
        estimator(queries, torch.full((4,), 2.0, device=META), generator=new_generator(META, 0))
    kinds = {(sync.kind, sync.where.split(":")[0]) for sync in counter.syncs}
    assert ("to-host", "faiss_index.py") in kinds and ("blocking-copy", "faiss_index.py") in kinds, counter.summary()
