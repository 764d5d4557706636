"""Training: iCT pieces against their formulas, resume bit-exactness, CPU DDP, every experiment, NaN guard."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from knn_cm.data import load_digits
from knn_cm.diffusion import pf_ode_step
from knn_cm.estimators import make_estimator
from knn_cm.training import (
    EMA,
    ICTObjective,
    NonFiniteLossError,
    StepRandom,
    curriculum_steps,
    karras_levels,
    level_probabilities,
    list_checkpoints,
    load_checkpoint,
    pseudo_huber,
)
from knn_cm.training.config import trainer_config
from knn_cm.training.stream import BatchStream
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Training experiments: the top-level files except evaluate.py's (which set a task).
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "train" / "experiment").glob("*.yaml"))


# ------------------------------------------------------------------------------------ iCT pieces
def test_curriculum_matches_ict():
    assert [curriculum_steps(k, 400_000) for k in (0, 49_999, 50_000, 350_000)] == [11, 11, 21, 1281]
    assert curriculum_steps(399_999, 400_000) == 1281 and curriculum_steps(100_000, 400_000) == 41


def test_curriculum_does_not_floor_the_logarithm():
    # s1 / s0 = 100 is not a power of two: K' = floor(400,000 / (log2 100 + 1)) = floor(52,329.6) = 52,329
    # (iCT), not the 57,142 that floor(log2 100) = 6 would give.
    assert math.floor(400_000 / (math.log2(100) + 1)) == 52_329
    steps = (0, 52_328, 52_329, 104_658, 313_974, 366_303)
    assert [curriculum_steps(k, 400_000, s0=10, s1=1000) for k in steps] == [11, 11, 21, 41, 641, 1001]
    assert curriculum_steps(57_141, 400_000, s0=10, s1=1000) == 21


def test_noise_level_distribution_is_the_erf_formula():
    sigmas = karras_levels(41)
    probabilities = level_probabilities(sigmas, p_mean=-1.1, p_std=2.0)
    assert probabilities.shape == (40,) and abs(float(probabilities.sum()) - 1.0) < 1e-12
    erf = [math.erf((math.log(float(s)) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas]
    expected = torch.tensor([b - a for a, b in zip(erf, erf[1:])], dtype=torch.float64)
    assert torch.allclose(probabilities, expected / expected.sum(), rtol=1e-12, atol=0)
    # Karras levels: ascending from sigma_min to sigma_max with rho 7.
    assert float(sigmas[0]) == pytest.approx(0.002) and float(sigmas[-1]) == pytest.approx(80.0)
    middle = (0.002 ** (1 / 7) + 0.5 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert float(sigmas[20]) == pytest.approx(middle, rel=1e-12)


def test_pseudo_huber_values():
    a, b = torch.zeros(2, 1, 2, 2), torch.tensor([3.0, 4.0, 0.0, 0.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    assert torch.allclose(pseudo_huber(a, b, c=0.0), torch.tensor([5.0, 5.0]))
    c = 0.0299
    assert torch.allclose(pseudo_huber(a, b, c=c), torch.full((2,), math.sqrt(25 + c * c) - c))
    per_element = (math.sqrt(9 + 0.03**2) + math.sqrt(16 + 0.03**2) + 2 * 0.03 - 4 * 0.03) / 4
    assert torch.allclose(pseudo_huber(a, b, c=0.03, per_element=True), torch.full((2,), per_element))


def test_ict_loss_uses_lambda_and_pseudo_huber():
    """With identity networks and the single-sample estimator, the loss is known in closed form."""
    objective = ICTObjective(make_estimator("single"), total_steps=100, solver="euler")
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    replay = torch.Generator().manual_seed(3)
    identity = lambda z, sigma: z
    loss, stats = objective(identity, x, 0, StepRandom.seeded(3))
    sigmas, probabilities = objective.levels(0)
    index = torch.multinomial(probabilities, 6, replacement=True, generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    gap = (sigmas[index + 1] - sigmas[index]).float()
    c = 0.00054 * math.sqrt(16)
    distance = (gap.square() * noise.flatten(1).square().sum(1) + c * c).sqrt() - c  # ||(s_hi - s_lo) eps||
    expected = (distance / gap).mean()  # lambda = 1 / (sigma_{i+1} - sigma_i)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert stats["num_levels"] == 11


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_single_sample_step_is_the_ict_identity(solver):
    """Appendix A.5: an ODE step with the single-sample estimator gives z_i = x + sigma_i * eps exactly."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=generator) * 2 - 1
    eps = torch.randn(x.shape, generator=generator)
    sigmas = karras_levels(1281).float()
    index = torch.randint(0, 1280, (64,), generator=generator)
    high, low = sigmas[index + 1], sigmas[index]
    stepped = pf_ode_step(make_estimator("single"), x + high.reshape(-1, 1, 1, 1) * eps, high, low, solver, x=x)
    expected = x + low.reshape(-1, 1, 1, 1) * eps
    scale = (x.abs() + high.reshape(-1, 1, 1, 1) * eps.abs()).max()
    assert (stepped - expected).abs().max() <= 8 * torch.finfo(torch.float32).eps * scale


def test_ema_schedules():
    model = torch.nn.Linear(2, 2)
    constant = EMA(model, kind="constant", decay=0.99993, warmup=True)
    assert constant.decay_at(0, 0, 8) == pytest.approx(0.1) and constant.decay_at(10**6, 0, 8) == 0.99993
    halflife = EMA(model, kind="halflife", halflife_images=500_000, rampup_ratio=0.05)
    assert halflife.decay_at(0, 10**9, 512) == pytest.approx(0.5 ** (512 / 500_000))
    assert halflife.decay_at(0, 1_000_000, 512) == pytest.approx(0.5 ** (512 / 50_000))
    before = constant.model.weight.clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    constant.update(model, step=0, images_seen=0, batch_size=8)  # decay 0.1: 90% of the way to 1
    assert torch.allclose(constant.model.weight, 0.1 * before + 0.9)


@pytest.mark.parametrize("experiment", ["ict", "ict_knn", "ict_stf", "figure4_baseline", "figure4_k", "figure4_n"])
def test_paper_ict_runs_use_the_constant_ema(experiment):
    # Table 3 / iCT: 0.99993 from step 0. The warm-up min(decay, (1 + k) / (10 + k)) would reach it only at
    # step 128,562 and change every early snapshot Figure 4 plots.
    ema = compose_train([f"experiment={experiment}", "run_name=x"]).trainer.ema
    assert ema.kind == "constant" and ema.decay == 0.99993 and ema.warmup is False
    schedule = EMA(torch.nn.Linear(1, 1), **OmegaConf.to_container(ema))
    assert [schedule.decay_at(step, 0, 1024) for step in (0, 1, 1000, 128_561)] == [0.99993] * 4
    assert EMA(torch.nn.Linear(1, 1), warmup=True).decay_at(128_561, 0, 1) < 0.99993
    assert EMA(torch.nn.Linear(1, 1), warmup=True).decay_at(128_562, 0, 1) == 0.99993


def test_quickstart_keeps_the_ema_warmup():
    ema = compose_train(["experiment=quickstart", "run_name=x"]).trainer.ema
    assert ema.warmup is True and ema.decay == 0.999


def test_batch_stream_is_a_sequence_of_permutations():
    stream = BatchStream(10, seed=1)
    first_epoch = stream.indices(0, 10)
    assert sorted(first_epoch.tolist()) == list(range(10))
    across = stream.indices(7, 6)  # crosses into epoch 1
    assert torch.equal(across[:3], first_epoch[7:]) and torch.equal(across[3:], BatchStream(10, 1).indices(10, 3))


# ------------------------------------------------------------------------------------- runs
def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_overrides(experiment: str = "quickstart", steps: int = 2) -> list[str]:
    """A tiny model on digits for a couple of steps, whatever the experiment's own dataset and model."""
    config = compose_train([f"experiment={experiment}", "run_name=test"])
    is_flow = config.trainer.objective._target_.endswith("FlowMatchingObjective")  # see test_flow_matching.py
    is_edm = config.trainer.objective._target_.endswith("EDMObjective") or is_flow
    overrides = [f"experiment={experiment}", "run_name=test", "dataset=digits",
                 f"model={'ddpmpp_tiny' if is_edm else 'ncsnpp_tiny'}", *(["model.precond=fm"] if is_flow else []),
                 f"trainer.max_steps={steps}", "trainer.batch_size=8", "trainer.log_every=1",
                 "trainer.checkpoint_every=1", "trainer.num_sample_images=4", "trainer.progress=false",
                 "trainer.device=cpu", "trainer.snapshot_every=null", "trainer.sample_every=null"]
    if not is_edm:
        overrides += ["trainer.objective.s1=20"]
    if config.estimator.name == "knn":
        overrides += ["estimator.k=32", "estimator.n=8"]
    elif config.estimator.name == "stf":
        overrides += ["estimator.n=16"]
    return overrides


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_trains_two_steps(experiment, tmp_path):
    paper = compose_train([f"experiment={experiment}", "run_name=x"])
    # the paper's (Table 3, docs/hyperparameters.md)
    if experiment in ("ict", "ict_knn", "ict_stf", "edm", "edm_stf", "edm_knn"):
        assert paper.dataset.name == "cifar10" and paper.trainer.batch_size in (1024, 512)
        if experiment.startswith("ict"):
            assert paper.trainer.max_steps == 400_000 and paper.trainer.ema.decay == 0.99993
            assert paper.trainer.objective.solver == ("euler" if experiment == "ict" else "heun")
            assert paper.model.precond == "cm" and paper.model.network.dropout == 0.3
    trainer = train.run(compose_train(tiny_overrides(experiment)), tmp_path)
    assert trainer.step == 2
    assert (tmp_path / "metrics.jsonl").exists() and list((tmp_path / "samples").glob("*.png"))
    assert list_checkpoints(tmp_path)[-1].name == "training-000000002.pt"


def _weights(trainer) -> dict:
    return {f"model.{k}": v for k, v in trainer.model.state_dict().items()} | \
           {f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    """2K steps in one go equal K steps, a stop, resume=auto, and K more (weights, EMA, optimizer)."""
    overrides = tiny_overrides("quickstart", steps=6)
    straight = train.run(compose_train(overrides), tmp_path / "straight")
    train.run(compose_train(overrides + ["trainer.stop_after_steps=3"]), tmp_path / "resumed")
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["training-000000002.pt",
                                                                         "training-000000003.pt"]
    resumed = train.run(compose_train(overrides + ["trainer.resume=auto"]), tmp_path / "resumed")
    assert resumed.step == straight.step == 6
    # A resume, not a deterministic restart from scratch (which would end on the same weights):
    assert resumed.resumed_from.name == "training-000000003.pt" and resumed.start_step == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
            ] == [1, 2, 3, 4, 5, 6], "each step trained (and logged) once across the two invocations"
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, _weights(resumed)[name]), name
    first = straight.optimizer.state_dict()["state"]
    second = resumed.optimizer.state_dict()["state"]
    for key in first:
        for field in first[key]:
            assert torch.equal(torch.as_tensor(first[key][field]), torch.as_tensor(second[key][field])), (key, field)


def _ddp_worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    trainer = train.run(compose_train(overrides), Path(run_dir))
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, Path(run_dir) / f"rank{rank}.pt")




def test_two_process_cpu_ddp_keeps_ranks_identical(tmp_path):
    overrides = tiny_overrides("quickstart", steps=3)
    mp.spawn(_ddp_worker, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    initial_run = train.run(compose_train(overrides + ["trainer.stop_after_steps=0"]), tmp_path / "initial")
    initial = initial_run.model.state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "the DDP run must have trained"
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["world_size"] == 2 and len(state["generators"]) == 2 and state["images_seen"] == 3 * 8


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = ICTObjective.__call__

    def poisoned(self, net, x, step, random):
        loss, stats = original(self, net, x, step, random)
        return (loss * float("nan") if step == 2 else loss), stats

    monkeypatch.setattr(ICTObjective, "__call__", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2.*training-000000002\.pt"):
        train.run(compose_train(tiny_overrides("quickstart", steps=5)), tmp_path)
    last = list_checkpoints(tmp_path)[-1]
    state = load_checkpoint(last)
    assert last.name == "training-000000002.pt" and state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _signal_at_step(monkeypatch, signum: int, at_step: int) -> None:
    """The objective sends ``signum`` to this process during step ``at_step`` (as a cluster would)."""
    original = ICTObjective.__call__

    def signalling(self, net, x, step, random):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return original(self, net, x, step, random)

    monkeypatch.setattr(ICTObjective, "__call__", signalling)


def test_a_preemption_signal_checkpoints_the_running_step_and_resume_continues(tmp_path, monkeypatch):
    overrides = tiny_overrides("quickstart", steps=6) + ["trainer.checkpoint_every=100"]
    straight = train.run(compose_train(overrides + ["trainer.preemption_signals=[]"]), tmp_path / "straight")
    with monkeypatch.context() as patch:
        _signal_at_step(patch, signal.SIGUSR1, at_step=2)
        with pytest.raises(SystemExit) as stopped:
            train.run(compose_train(overrides), tmp_path / "preempted")
    assert stopped.value.code == 128 + signal.SIGUSR1
    # No periodic checkpoint was due: the signal's step (the third) was checkpointed on the way out.
    assert [p.name for p in list_checkpoints(tmp_path / "preempted")] == ["training-000000003.pt"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "the previous handler must be restored"
    resumed = train.run(compose_train(overrides), tmp_path / "preempted")
    assert resumed.step == 6 and resumed.start_step == 3
    assert resumed.resumed_from.name == "training-000000003.pt"
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, _weights(resumed)[name]), name


def test_a_preemption_signal_hands_over_to_the_previous_handler(tmp_path, monkeypatch):
    """submitit's SIGUSR2 handler (requeue) runs after the checkpoint is written; training then ends."""
    calls = []

    def requeue(signum, frame):
        calls.append((signum, [p.name for p in list_checkpoints(tmp_path)]))

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        _signal_at_step(monkeypatch, signal.SIGUSR2, at_step=1)
        trainer = train.run(compose_train(tiny_overrides("quickstart", steps=6) + ["trainer.checkpoint_every=100"]),
                            tmp_path)
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert trainer.step == 2
    assert calls == [(signal.SIGUSR2, ["training-000000002.pt"])]


def test_unknown_preemption_signal_is_refused():
    with pytest.raises(ValueError, match="unknown or unsupported preemption signal 'SIGKILL'; allowed: SIGTERM"):
        trainer_config({"preemption_signals": ["SIGKILL"]})


def test_quickstart_defaults_fit_a_laptop():
    config = compose_train(["run_name=x"])
    assert config.dataset.name == "digits" and config.estimator.name == "knn"
    assert config.trainer.objective.solver == "heun" and config.trainer.max_steps <= 2500
    assert load_digits().shape == (config.dataset.channels, config.dataset.resolution, config.dataset.resolution)


def test_wandb_logging_offline_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = tiny_overrides("quickstart", steps=2) + ["logger=wandb"]
    train.run(compose_train(overrides + ["trainer.stop_after_steps=1"]), tmp_path)
    run_id = (tmp_path / "wandb_id.txt").read_text()
    time.sleep(1.1)  # wandb names offline folders by the second: two invocations within one second share a folder
    train.run(compose_train(overrides), tmp_path)
    assert (tmp_path / "wandb_id.txt").read_text() == run_id
    offline_runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 2, "both invocations log into the same wandb run id"


def test_gradient_accumulation_matches_the_full_batch(tmp_path, monkeypatch):
    """Two micro-batches of 4 give the optimizer step of one batch of 8 (with a deterministic loss, so
    only the accumulation differs; the real objectives draw their noise per micro-batch)."""

    def deterministic(self, net, x, step, random):
        sigma = torch.full((x.shape[0],), 0.5)
        return (net(x, sigma) - x).square().mean(), {}

    monkeypatch.setattr(ICTObjective, "__call__", deterministic)
    overrides = tiny_overrides("ict", steps=2) + ["trainer.grad_clip=0.01"]
    full = train.run(compose_train(overrides), tmp_path / "full")
    accumulated = train.run(compose_train(overrides + ["trainer.micro_batch_size=4"]), tmp_path / "accumulated")
    assert accumulated.accumulation == 2 and full.accumulation == 1
    for name, tensor in full.model.state_dict().items():
        assert torch.allclose(tensor, accumulated.model.state_dict()[name], rtol=1e-5, atol=1e-7), name
