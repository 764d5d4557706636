"""Flow matching with estimator targets: the process (Algorithm 2), the objective, the velocity network, the
samplers on the flow ODE, and the experiments (compose, train, resume, evaluate).

Convention throughout: x_t = (1 - t) x + t eps, t = 1 is noise, v(x_t, t) = E[eps - x | x_t] = (x_t - E[x | x_t]) / t.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from knn_cm.data import DataStore
from knn_cm.diffusion import FlowMatchingProcess, VEProcess
from knn_cm.estimators import make_estimator
from knn_cm.models import FMPrecond, SongUNet, build_denoiser, load_network, save_network
from knn_cm.sampling import estimator_velocity, flow_hybrid_sample, flow_sample, make_sampler, noise_for_seeds
from knn_cm.sampling.flow import data_mean, flow_nfe, flow_times
from knn_cm.sampling.generate import generate, resolve_kind, sampler_settings
from knn_cm.search import build_index
from knn_cm.training import FlowMatchingObjective, StepRandom, list_checkpoints
from knn_cm.training.flow_matching import flow_matching_target

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FM_EXPERIMENTS = ("digits_fm", "digits_fm_stf", "digits_fm_knn", "fm", "fm_stf", "fm_knn")


@pytest.fixture(scope="module")
def small_store() -> DataStore:
    """48 random uint8 images 1x2x2 (d = 4): posteriors that are neither a point mass nor uniform at mid t."""
    images = np.random.default_rng(3).integers(0, 256, size=(48, 1, 2, 2), dtype=np.uint8)
    return DataStore.from_array(images, name="small")


def brute_force_posterior_mean(store: DataStore, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """E[x | x_t] in float64 straight from the flow path: p(x_i | x_t) proportional to N(x_t; (1 - t) x_i, t^2 I)."""
    data = store.float(dtype=torch.float64).reshape(len(store), -1)
    query = x_t.to(torch.float64).reshape(x_t.shape[0], -1)
    log_weights = -(query[:, None, :] - (1 - t) * data[None]).square().sum(-1) / (2 * t * t)
    return (torch.softmax(log_weights, dim=1) @ data).reshape(x_t.shape)


def brute_force_velocity(store: DataStore, x: torch.Tensor, t: float) -> torch.Tensor:
    """v(x_t, t) = (x_t - E[x | x_t]) / t in float64; at t = 1 the posterior is the prior (uniform weights)."""
    x = x.to(torch.float64)
    if t >= 1:
        return x - store.float(dtype=torch.float64).mean(dim=0)
    return (x - brute_force_posterior_mean(store, x, t)) / t


# ------------------------------------------------------------------------------------------------- process
def test_flow_process_scale_sigma_and_path(small_store):
    process = FlowMatchingProcess()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(process.scale(t), 1 - t) and torch.allclose(process.sigma(t), t / (1 - t))
    x = small_store.float(torch.arange(3), dtype=torch.float64)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = process.add_noise(x, t, eps)
    assert torch.equal(x_t, (1 - t.reshape(-1, 1, 1, 1)) * x + t.reshape(-1, 1, 1, 1) * eps)
    # the same point as the generic Gaussian form z = s(t) (x + sigma(t) eps) of Appendix B
    s, sigma = (1 - t).reshape(-1, 1, 1, 1), (t / (1 - t)).reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t, s * (x + sigma * eps), atol=1e-12)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.95])
def test_exact_estimator_on_the_flow_path_matches_a_float64_brute_force(small_store, t):
    process = FlowMatchingProcess()
    generator = torch.Generator().manual_seed(1)
    x = small_store.float(torch.randint(0, len(small_store), (16,), generator=generator), dtype=torch.float64)
    x_t = process.add_noise(x, t, torch.randn(x.shape, generator=generator, dtype=torch.float64))
    exact = make_estimator("exact", small_store, dtype=torch.float64)
    reference = brute_force_posterior_mean(small_store, x_t, t)
    assert torch.allclose(process.posterior_mean(exact, x_t, t), reference, atol=1e-10)
    assert torch.allclose(process.velocity(exact, x_t, t), (x_t - reference) / t, atol=1e-9)


@pytest.mark.parametrize("name", ["exact", "stf", "knn", "mc", "uniform", "single"])
def test_algorithm_2_identity_every_estimator(small_store, name):
    """Appendix B: E[x | x_t] through the flow process is the VE estimator at x_t / (1 - t), noise level t / (1 - t),
    bit for bit for the same draws."""
    process, t = FlowMatchingProcess(), torch.full((16,), 0.4)
    generator = torch.Generator().manual_seed(2)
    x = small_store.float(torch.randint(0, len(small_store), (16,), generator=generator))
    x_t = process.add_noise(x, t, torch.randn(x.shape, generator=generator))
    kwargs = {"index": build_index(small_store, "flat"), "k": 16, "n": 8} if name == "knn" else \
        {"n": 8} if name in ("stf", "mc", "uniform") else {}
    estimator = make_estimator(name, small_store, **kwargs)
    through_process = process.posterior_mean(estimator, x_t, t, x=x, generator=torch.Generator().manual_seed(5))
    direct = estimator(x_t / (1 - t).reshape(-1, 1, 1, 1), t / (1 - t), x=x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(through_process, direct)
    ve = VEProcess().posterior_mean(estimator, x_t / (1 - t).reshape(-1, 1, 1, 1), t / (1 - t), x=x,
                                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(through_process, ve)


def test_knn_with_every_neighbour_converges_to_the_brute_force(small_store):
    """k = N makes the proposal the posterior: many draws average to the exact posterior mean (float64 reference)."""
    process, t = FlowMatchingProcess(), 0.5
    generator = torch.Generator().manual_seed(4)
    x = small_store.float(torch.randint(0, len(small_store), (8,), generator=generator))
    x_t = process.add_noise(x, t, torch.randn(x.shape, generator=generator))
    knn = make_estimator("knn", small_store, index=build_index(small_store, "flat"), k=len(small_store), n=4096)
    estimate = process.posterior_mean(knn, x_t, t, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    assert (estimate - brute_force_posterior_mean(small_store, x_t, t)).abs().max() < 0.02


# ------------------------------------------------------------------------------------------------ objective
def test_single_sample_target_is_eps_minus_x_bit_for_bit(small_store):
    process = FlowMatchingProcess()
    generator = torch.Generator().manual_seed(6)
    x = small_store.float(torch.randint(0, len(small_store), (256,), generator=generator))
    noise = torch.randn(x.shape, generator=generator)
    t = torch.rand(256, generator=generator) * 0.98 + 0.01
    x_t = process.add_noise(x, t, noise)
    target = flow_matching_target(process, make_estimator("single", small_store), x_t, t, x, noise)
    assert torch.equal(target, noise - x)
    # The test can fail: the textbook form (x_t - x_hat) / t rounds differently from eps - x.
    assert not torch.equal((x_t - x) / t.reshape(-1, 1, 1, 1), noise - x)


class RecordingVelocity(torch.nn.Module):
    """A 'network' returning a fixed linear map of x_t and recording its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.scale * x_t


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
@pytest.mark.parametrize("weighting", ["uniform", "edm"])
def test_objective_loss_is_the_flow_matching_loss(small_store, time_sampling, weighting):
    """With the single-sample estimator the loss is mean_b w(t_b) mean_pixels (v(x_t, t) - (eps - x))^2, with t then
    eps drawn from the noise generator in that order."""
    objective = FlowMatchingObjective(make_estimator("single", small_store), time_sampling=time_sampling,
                                      weighting=weighting)
    x = small_store.float(torch.arange(32))
    network = RecordingVelocity()
    loss, stats = objective(network, x, 0, StepRandom.seeded(7))
    replay = torch.Generator().manual_seed(7)
    if time_sampling == "uniform":
        t = 1e-5 + (0.99999 - 1e-5) * torch.rand(32, generator=replay)
    else:
        t = torch.sigmoid(torch.randn(32, generator=replay)).clamp(1e-5, 0.99999)
    noise = torch.randn(x.shape, generator=replay)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x + t.reshape(-1, 1, 1, 1) * noise
    assert torch.equal(network.calls[0][1], t) and torch.equal(network.calls[0][0], x_t)
    weight = torch.ones(32) if weighting == "uniform" else ((1 - t) ** 2 * 0.25 + t**2) / 0.25
    expected = (weight * (0.3 * x_t - (noise - x)).square().flatten(1).mean(1)).mean()
    assert torch.allclose(loss, expected, rtol=1e-6) and loss.requires_grad
    assert "estimator_seconds" in stats


def test_logit_normal_and_uniform_time_sampling():
    generator = torch.Generator().manual_seed(8)
    logit = FlowMatchingObjective(None, time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = logit.sample_times(20000, generator).to(torch.float64)
    n = torch.log(t / (1 - t))
    assert abs(float(n.mean()) - 0.5) < 0.03 and abs(float(n.std()) - 0.8) < 0.03
    uniform = FlowMatchingObjective(None, time_sampling="uniform", t_min=0.1, t_max=0.6)
    t = uniform.sample_times(20000, generator)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.6 and abs(float(t.mean()) - 0.35) < 0.01


def test_edm_weighting_gives_the_raw_network_unit_weight():
    """w(t) c_out(t)^2 = 1 for weighting="edm" with FMPrecond's c_out (EDM's principle on the flow path)."""
    network = FMPrecond(SongUNet(img_resolution=4, in_channels=1, out_channels=1, model_channels=4,
                                 channel_mult=[1], num_blocks=1, attn_resolutions=[]), sigma_data=0.6)
    t = torch.linspace(0, 1, 11)
    _, c_out, _, _ = network.coefficients(t)
    weight = FlowMatchingObjective(None, weighting="edm", sigma_data=0.6).weight(t)
    assert torch.allclose(weight * c_out.reshape(-1) ** 2, torch.ones(11), atol=1e-6)


def test_stf_and_knn_targets_are_closer_to_the_marginal_velocity(small_store):
    """At mid t the single-sample target eps - x scatters around v(x_t, t); STF and KNN targets sit much closer."""
    process = FlowMatchingProcess()
    generator = torch.Generator().manual_seed(9)
    x = small_store.float(torch.randint(0, len(small_store), (512,), generator=generator))
    noise = torch.randn(x.shape, generator=generator)
    t = torch.full((512,), 0.5)
    x_t = process.add_noise(x, t, noise)
    truth = brute_force_velocity(small_store, x_t, 0.5).to(torch.float32)
    errors = {}
    for name, kwargs in {"single": {}, "stf": {"n": 32}, "knn": {"index": build_index(small_store, "flat"),
                                                                 "k": 16, "n": 32}}.items():
        target = flow_matching_target(process, make_estimator(name, small_store, **kwargs), x_t, t, x, noise,
                                      torch.Generator().manual_seed(0))
        errors[name] = float((target - truth).square().mean())
    assert errors["knn"] < errors["single"] / 10 and errors["stf"] < errors["single"] / 2


@pytest.mark.parametrize("setting, value, message", [
    ("time_sampling", "beta", "time_sampling must be one of"), ("weighting", "snr", "weighting must be one of"),
    ("t_min", 0.0, "0 < t_min < t_max < 1"), ("t_max", 1.0, "0 < t_min < t_max < 1"),
    ("logit_std", 0.0, "logit_std"), ("sample_steps", 0, "sample_steps")])
def test_bad_objective_settings_name_the_setting(setting, value, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchingObjective(None, **{setting: value})


# --------------------------------------------------------------------------------------------- the network
def _tiny_velocity_network(sigma_data: float = 0.5) -> FMPrecond:
    torch.manual_seed(0)
    return FMPrecond(SongUNet(img_resolution=2, in_channels=1, out_channels=1, model_channels=4, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[]), sigma_data=sigma_data)


def test_fm_precond_coefficients_make_unit_variance_input_and_target():
    """For data of std sd: Var[c_in x_t] = 1 and Var[(eps - x - c_skip x_t) / c_out] = 1 at every t (EDM App. B.6)."""
    sd = 0.5
    network = _tiny_velocity_network(sd)
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(200_000, dtype=torch.float64, generator=generator) * sd
    eps = torch.randn(200_000, dtype=torch.float64, generator=generator)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        c_skip, c_out, c_in, c_noise = (c.reshape(-1)[0].double() for c in network.coefficients(torch.tensor([t])))
        x_t = (1 - t) * x + t * eps
        assert abs(float((c_in * x_t).var()) - 1) < 0.02
        assert abs(float(((eps - x - c_skip * x_t) / c_out).var()) - 1) < 0.02
        assert float(c_noise) == pytest.approx(1000 * t)
    c_skip, c_out, c_in, _ = network.coefficients(torch.tensor([0.0, 1.0]))
    assert c_skip.reshape(-1).tolist() == [-1.0, 1.0] and c_out.reshape(-1).tolist() == [1.0, sd]


def test_fm_precond_file_round_trip_and_bad_time(tmp_path):
    network = _tiny_velocity_network()
    path = save_network(tmp_path / "fm.pt", network, metadata={"step": 3})
    loaded = load_network(path)
    assert isinstance(loaded, FMPrecond) and loaded.sigma_data == 0.5
    x, t = torch.randn(3, 1, 2, 2), torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(loaded(x, t), network(x, t))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        network(x, torch.tensor([0.5, 1.5, 0.1]))
    built = build_denoiser({"img_resolution": 2, "in_channels": 1, "out_channels": 1, "model_channels": 4,
                            "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}, precond="fm")
    assert isinstance(built, FMPrecond)


# -------------------------------------------------------------------------------------------------- samplers
def test_euler_with_the_exact_estimator_follows_a_float64_integration_of_the_marginal_ode(small_store):
    """Acceptance: the Euler sampler with the exact estimator reproduces an independent float64 Euler integration of
    dx/dt = v(x, t) (posterior weights computed here from the flow path), and both converge to a fine RK4 solution."""
    noise = noise_for_seeds(range(12), small_store.shape)
    exact = make_estimator("exact", small_store)

    def reference_euler(num_steps):
        x = noise.to(torch.float64)
        times = [1 - i / num_steps for i in range(num_steps + 1)]
        for t_cur, t_next in zip(times[:-1], times[1:]):
            x = x + (t_next - t_cur) * brute_force_velocity(small_store, x, t_cur)
        return x

    for num_steps in (4, 32):
        sampled = flow_sample(estimator_velocity(exact), noise, num_steps, solver="euler").to(torch.float64)
        assert (sampled - reference_euler(num_steps)).abs().max() < 1e-4, num_steps

    # Convergence: the Euler state at t = 1/2 approaches a 2,000-step float64 RK4 solution at first order, and the
    # end points (training images: the exact flow memorises) agree once the steps are fine.
    def rk4(x, start, stop, num_steps=2000):
        times = np.linspace(start, stop, num_steps + 1)
        for t_cur, t_next in zip(times[:-1], times[1:]):
            h = t_next - t_cur
            k1 = brute_force_velocity(small_store, x, t_cur)
            k2 = brute_force_velocity(small_store, x + h / 2 * k1, t_cur + h / 2)
            k3 = brute_force_velocity(small_store, x + h / 2 * k2, t_cur + h / 2)
            k4 = brute_force_velocity(small_store, x + h * k3, t_next)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    middle = rk4(noise.to(torch.float64), 1.0, 0.5)
    end = brute_force_posterior_mean(small_store, rk4(middle, 0.5, 0.02), 0.02)  # a point mass below t = 0.02
    errors, end_errors = [], []
    for steps in (8, 64, 512):
        final, trajectory = flow_sample(estimator_velocity(exact), noise, steps, return_trajectory=True)
        errors.append(float((trajectory[steps // 2].to(torch.float64) - middle).abs().max()))
        end_errors.append(float((final.to(torch.float64) - end).abs().max()))
    assert errors[0] > 4 * errors[1] > 16 * errors[2] and errors[2] < 1e-3, errors
    assert end_errors[1] < 1e-5 and end_errors[2] < 1e-5, end_errors


def test_euler_and_heun_steps_on_a_linear_velocity():
    """v(x, t) = x: Euler gives x_1 (1 - h)^S and Heun x_1 (1 - h + h^2 / 2)^S with h = 1 / S."""
    noise = noise_for_seeds(range(3), (1, 2, 2))
    calls = []

    def velocity(x, t):
        calls.append(float(t[0]))
        return x

    for solver, factor in (("euler", lambda h: 1 - h), ("heun", lambda h: 1 - h + h * h / 2)):
        for steps in (1, 2, 5):
            calls.clear()
            out = flow_sample(velocity, noise, steps, solver=solver)
            assert torch.allclose(out, noise * factor(1 / steps) ** steps, atol=1e-6)
            assert len(calls) == flow_nfe(steps, solver)
            assert calls[0] == 1.0 and (solver == "euler" or calls[-1] == 0.0)


def test_estimator_velocity_at_t_one_is_the_data_offset_and_heun_ends_with_euler(small_store):
    exact = make_estimator("exact", small_store)
    velocity = estimator_velocity(exact)
    x = noise_for_seeds(range(4), small_store.shape)
    assert torch.allclose(velocity(x, torch.ones(4)).double(), x.double() - data_mean(small_store), atol=1e-6)
    assert torch.allclose(data_mean(small_store), small_store.float(dtype=torch.float64).mean(0), atol=1e-12)
    calls = []

    def counting(z, sigma, **kwargs):
        calls.append(float(sigma[0]))
        return exact(z, sigma, **kwargs)

    counting.store = small_store
    samples = flow_sample(estimator_velocity(counting), x, 3, solver="heun")
    assert len(calls) == flow_nfe(3, "heun", defined_at_zero=False) - 1  # t = 1 uses the data mean, not the estimator
    # The last step onto t = 0 is Euler: it lands on the posterior mean at the last positive time.
    assert torch.allclose(samples, samples.clamp(-1, 1)) and min(calls) > 0


def test_flow_hybrid_limits_and_switch(small_store):
    knn = make_estimator("knn", small_store, index=build_index(small_store, "flat"), k=16, n=8)
    network = _tiny_velocity_network()
    noise = noise_for_seeds(range(6), small_store.shape)
    seeded = lambda: torch.Generator().manual_seed(11)
    assert torch.equal(flow_hybrid_sample(knn, network, noise, 1.0, 4), flow_sample(network, noise, 4, "heun"))
    assert torch.equal(flow_hybrid_sample(knn, network, noise, 0.0, 4, generator=seeded()),
                       flow_sample(estimator_velocity(knn, seeded()), noise, 4, "heun"))
    times = []
    original = network.forward

    def recording(x, t, *args, **kwargs):
        times.append(float(t.reshape(-1)[0]))
        return original(x, t, *args, **kwargs)

    network.forward = recording
    flow_hybrid_sample(knn, network, noise, 0.6, 4, solver="euler", generator=seeded())
    # t_switch inserted into [1, .75, .5, .25, 0]; the network from it on
    assert times == pytest.approx([0.6, 0.5, 0.25])


def test_flow_samplers_through_make_sampler_use_seed_i(small_store):
    network = _tiny_velocity_network()
    assert resolve_kind("auto", network) == "flow_heun" and resolve_kind("auto", "FMPrecond") == "flow_heun"
    assert sampler_settings("flow_hybrid", {"num_steps": 4, "t_switch": 0.3, "rho": 2}) == {"num_steps": 4,
                                                                                           "t_switch": 0.3}
    for kind in ("flow_euler", "flow_heun", "flow_pf_ode", "flow_hybrid"):
        estimator = make_estimator("stf", small_store, n=8)
        sampler = make_sampler(kind, network=network, estimator=estimator, num_steps=3, t_switch=0.5)
        whole = generate(sampler, range(6), small_store.shape, batch_size=6)
        assert whole.shape == (6, *small_store.shape)
        if kind in ("flow_euler", "flow_heun"):  # deterministic: sample i is the same in any batch
            assert torch.equal(whole, generate(sampler, range(6), small_store.shape, batch_size=4))
    with pytest.raises(ValueError, match="needs estimator"):
        make_sampler("flow_pf_ode", network=network)


def test_bad_sampler_input_names_the_argument():
    noise = noise_for_seeds(range(2), (1, 2, 2))
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        flow_sample(lambda x, t: x, noise, 0)
    with pytest.raises(ValueError, match="unknown ODE solver"):
        flow_sample(lambda x, t: x, noise, 2, solver="rk4")
    with pytest.raises(ValueError, match=r"t_max must be a number in \(0, 1\]"):
        flow_times(4, t_max=1.5)
    with pytest.raises(ValueError, match="t_switch must be"):
        flow_hybrid_sample(lambda *a, **k: None, lambda x, t: x, noise, -0.1)


# ----------------------------------------------------------------------------------------------- experiments
def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_fm_overrides(experiment: str, steps: int = 2) -> list[str]:
    """A few-thousand-parameter velocity network on digits for a few steps, whatever the experiment's size."""
    config = compose_train([f"experiment={experiment}", "run_name=test"])
    overrides = [f"experiment={experiment}", "run_name=test", "dataset=digits", "model=ddpmpp_tiny",
                 "model.precond=fm", f"trainer.max_steps={steps}", "trainer.batch_size=8", "trainer.log_every=1",
                 "trainer.checkpoint_every=1", "trainer.num_sample_images=4", "trainer.progress=false",
                 "trainer.device=cpu", "trainer.snapshot_every=null", "trainer.sample_every=null",
                 "trainer.objective.sample_steps=2"]
    if config.estimator.name == "knn":
        overrides += ["estimator.k=32", "estimator.n=8"]
    elif config.estimator.name == "stf":
        overrides += ["estimator.n=16"]
    return overrides


@pytest.mark.parametrize("experiment", FM_EXPERIMENTS)
def test_every_flow_matching_experiment_composes_and_trains_two_steps(experiment, tmp_path):
    paper = compose_train([f"experiment={experiment}", "run_name=x"])
    assert paper.model.precond == "fm" and paper.trainer.objective._target_.endswith("FlowMatchingObjective")
    if not experiment.startswith("digits"):  # Tong et al. 2023's CIFAR-10 recipe with DDPM++
        assert paper.dataset.name == "cifar10" and paper.model.network.model_channels == 128
        trainer_settings = paper.trainer
        assert (trainer_settings.batch_size, trainer_settings.optimizer.lr, trainer_settings.ema.decay,
                trainer_settings.max_steps, trainer_settings.grad_clip) == (128, 2e-4, 0.9999, 400_000, 1.0)
        assert trainer_settings.objective.time_sampling == "uniform"
    else:
        assert paper.trainer.max_steps == 1600 and paper.trainer.batch_size == 128
    expected_estimator = {"": "single", "stf": "stf", "knn": "knn"}[experiment.split("fm")[-1].lstrip("_")]
    assert paper.estimator.name == expected_estimator
    trainer = train.run(compose_train(tiny_fm_overrides(experiment)), tmp_path)
    assert trainer.step == 2 and isinstance(trainer.model, FMPrecond)
    assert {p.name for p in (tmp_path / "samples").glob("*.png")} == {"euler2-000000002.png", "heun2-000000002.png"}
    assert list_checkpoints(tmp_path)[-1].name == "training-000000002.pt"
    assert isinstance(load_network(tmp_path / "snapshots" / "network-000000002.pt"), FMPrecond)


def test_flow_matching_resume_is_bit_exact(tmp_path):
    """The objective's draws (t, eps, KNN's) live in the trainer's generators: a stopped and resumed run equals a
    straight one, weights, EMA and optimizer state."""
    overrides = tiny_fm_overrides("digits_fm_knn", steps=4)
    straight = train.run(compose_train(overrides), tmp_path / "straight")
    train.run(compose_train(overrides + ["trainer.stop_after_steps=2"]), tmp_path / "resumed")
    resumed = train.run(compose_train(overrides), tmp_path / "resumed")
    assert resumed.step == straight.step == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluate_scores_a_flow_matching_run_at_several_step_counts(tmp_path):
    run_dir = tmp_path / "run"
    train.run(compose_train(tiny_fm_overrides("digits_fm", steps=2) + ["trainer.snapshot_every=1"]), run_dir)
    for kind, steps in (("flow_euler", 1), ("flow_euler", 2), ("flow_heun", 1)):
        with initialize_config_dir(config_dir=str(ROOT / "configs" / "evaluate"), version_base="1.3"):
            config = compose(config_name="evaluate", overrides=[
                f"run_dir={run_dir}", "num_samples=32", "metrics.feature_extractor=digits", "metrics.isc=false",
                "progress=false", f"sampler.kind={kind}", f"sampler.num_steps={steps}"])
        records = evaluate.run(config, tmp_path / "eval")
        assert [r["step"] for r in records] == [1, 2]
        assert all(r["sampler"] == kind and r["sampler_settings"] == {"num_steps": steps} for r in records)
        assert all(r["fid"] is not None and r["fraction_memorised"] is not None for r in records)
    rows = list(csv.DictReader(open(run_dir / "evaluation.csv")))
    assert len(rows) == 6 and sum(row["best"] == "1" for row in rows) == 3  # one best per sampler setting


def test_flow_times_grid():
    times = flow_times(4)
    assert times.dtype == torch.float64 and times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert flow_times(2, t_max=0.5).tolist() == [0.5, 0.25, 0.0]
    assert math.isclose(float(flow_times(3)[1]), 2 / 3)


# ------------------------------------------------------------------------------------------- the study (item 5)
def test_velocity_study_rows_are_posterior_mean_errors_over_t_squared(small_store):
    from knn_cm.evaluation.velocity_error import velocity_error_study

    estimators = {"single-sample": make_estimator("mc", small_store, n=1),
                  "knn-all": make_estimator("knn", small_store, index=build_index(small_store, "flat"),
                                            k=len(small_store), n=2048)}
    rows = velocity_error_study(small_store, estimators, [0.3, 0.6], num_sources=64, repeats=4, progress=False)
    value = {(r["estimator"], r["t"], r["target"], r["metric"]): r["value"] for r in rows}
    for (name, t, target, metric), v in value.items():
        if target == "velocity":
            assert v == pytest.approx(value[(name, t, "posterior_mean", metric)] / t**2)
            assert value[(name, t, target, "mse")] == pytest.approx(value[(name, t, target, "bias2")] +
                                                                    value[(name, t, target, "variance")])
    # The single-sample velocity error is the conditional target's scatter E||x - mu||^2 / t^2 (> 0 at mid t);
    # KNN over all N with many draws is close to exact.
    assert value[("single-sample", 0.6, "velocity", "mse")] > 100 * value[("knn-all", 0.6, "velocity", "mse")]
    with pytest.raises(ValueError, match=r"flow-matching times in \(0, 1\)"):
        velocity_error_study(small_store, estimators, [0.5, 2.0], progress=False)


def test_estimator_study_app_on_the_flow_path(tmp_path):
    import evaluate_estimators

    with initialize_config_dir(config_dir=str(ROOT / "configs" / "estimator_study"), version_base="1.3"):
        config = compose(config_name="estimator_study", overrides=[
            "study.process=flow_matching", "study.times=[0.5,0.9]", "study.num_sources=8", "study.repeats=2",
            "study.progress=false", "estimators.knn.k=64", "estimators.knn.n=16", "estimators.stf.n=16"])
    rows = evaluate_estimators.run(config, tmp_path)
    assert {r["target"] for r in rows} == {"posterior_mean", "velocity"} and {r["t"] for r in rows} == {0.5, 0.9}
    assert (tmp_path / "estimator_error.png").exists() and "## velocity mse" in (tmp_path / "summary.md").read_text()
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "estimator_study"), version_base="1.3"):
        bad = compose(config_name="estimator_study", overrides=["study.process=vp"])
    with pytest.raises(ValueError, match="study.process must be one of"):
        evaluate_estimators.run(bad, tmp_path / "bad")
