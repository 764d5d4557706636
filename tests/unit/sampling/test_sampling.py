"""Samplers: Karras schedule, Heun / Euler accuracy, memorisation with exact and KNN estimators, hybrid
and forward-process sampling (Section 6), consistency sampling, seeds, reproducibility and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.diffusion import karras_sigmas
from knn_cm.estimators import make_estimator
from knn_cm.models import CMPrecond, EDMPrecond, SongUNet
from knn_cm.sampling import (
    consistency_sample,
    estimator_denoiser,
    euler_sample,
    forward_process_sample,
    heun_sample,
    hybrid_sample,
    make_sampler,
    noise_for_seeds,
    switch_schedule,
    tail_schedule,
)
from knn_cm.search import build_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def tiny_store() -> DataStore:
    """64 random uint8 images 1x4x4 (d = 16)."""
    images = np.random.default_rng(0).integers(0, 256, size=(64, *SHAPE), dtype=np.uint8)
    return DataStore.from_array(images, name="tiny")


@pytest.fixture(scope="module")
def song_unet() -> SongUNet:
    """A SongUNet at 4x4 with N(0, 0.2^2) weights, so its output is far from the zero-initialised one."""
    torch.manual_seed(0)
    net = SongUNet(img_resolution=4, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                   channel_mult_emb=2, num_blocks=1, attn_resolutions=[], dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def network(song_unet) -> EDMPrecond:
    return EDMPrecond(song_unet).eval()


@pytest.fixture(scope="module")
def knn(tiny_store):
    return make_estimator("knn", tiny_store, index=build_index(tiny_store, "flat"), k=16, n=64)


def distance_to_data(samples: torch.Tensor, store: DataStore) -> torch.Tensor:
    """Max-abs distance [B] from each sample to its nearest training image."""
    data = store.float()
    return (samples[:, None] - data[None]).abs().flatten(2).amax(dim=2).min(dim=1).values


class Recorder:
    """A denoiser that records the noise levels it is called with and delegates to ``inner``."""

    def __init__(self, inner):
        self.inner = inner
        self.sigmas: list[float] = []

    def __call__(self, z, sigma, **kwargs):
        assert z.dtype == torch.float32 and sigma.dtype == torch.float32 and sigma.shape == (z.shape[0],)
        self.sigmas.append(float(sigma[0]))
        return self.inner(z, sigma, **kwargs)


# ------------------------------------------------------------------------------------------ schedule
def test_karras_sigmas_closed_form_descending_and_final_zero():
    num_steps, sigma_min, sigma_max, rho = 18, 0.002, 80.0, 7.0
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    expected = [(sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
                ** rho for i in range(num_steps)] + [0.0]
    assert sigmas.dtype == torch.float64 and sigmas.shape == (num_steps + 1,)
    assert torch.allclose(sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert sigmas[0].item() == pytest.approx(sigma_max) and sigmas[-2].item() == pytest.approx(sigma_min)
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1].item() == 0.0
    assert karras_sigmas(1, sigma_min, sigma_max, rho).tolist() == [sigma_max, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps"), ({"num_steps": 2.5}, "num_steps"), ({"sigma_min": 0.0}, "sigma_min"),
    ({"sigma_max": 0.001}, "sigma_max"), ({"rho": 0.0}, "rho"),
])  # fmt: skip
def test_karras_sigmas_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        karras_sigmas(**kwargs)


# --------------------------------------------------------------------------------------- integrator
def test_heun_and_euler_solve_the_gaussian_pf_ode():
    """For data ~ N(0, s^2 I), D(z, sigma) = z s^2 / (s^2 + sigma^2) and the PF-ODE solution is
    z(sigma) = z_T sqrt(s^2 + sigma^2) / sqrt(s^2 + T^2): Heun converges at order 2, Euler at order 1."""
    data_std, sigma_max = 0.5, 80.0
    gaussian = lambda z, sigma: z * data_std**2 / (data_std**2 + sigma.reshape(-1, 1, 1, 1) ** 2)
    noise = noise_for_seeds(range(4), SHAPE)
    exact = noise.double() * sigma_max * data_std / math.sqrt(data_std**2 + sigma_max**2)

    def relative_error(sampler, num_steps):
        sample = sampler(gaussian, noise, num_steps=num_steps, sigma_max=sigma_max)
        assert sample.dtype == torch.float32
        return ((sample.double() - exact).abs().max() / exact.abs().max()).item()

    heun_100, heun_200 = relative_error(heun_sample, 100), relative_error(heun_sample, 200)
    euler_100, euler_200 = relative_error(euler_sample, 100), relative_error(euler_sample, 200)
    assert heun_100 < 3e-3 and heun_200 < 1e-3
    assert euler_100 > 10 * heun_100
    assert 3.0 < heun_100 / heun_200 < 5.0  # error ~ h^2
    assert 1.6 < euler_100 / euler_200 < 2.4  # error ~ h


def edm_sampler(net, latents, randn_like, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                S_max=float("inf"), S_noise=1):
    """EDM's ``generate.py: edm_sampler`` (Karras et al. 2022), transcribed as the reference."""
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho)
               + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("s_churn", [0.0, 10.0])
def test_heun_matches_edm_sampler_bit_for_bit(network, s_churn):
    noise = noise_for_seeds(range(4), SHAPE)
    generator = torch.Generator().manual_seed(8)
    randn_like = lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)
    with torch.no_grad():
        reference = edm_sampler(network, noise, randn_like, num_steps=6, S_churn=s_churn).to(torch.float32)
    ours = heun_sample(network, noise, num_steps=6, s_churn=s_churn, generator=torch.Generator().manual_seed(8))
    assert torch.equal(ours, reference)


def test_heun_calls_and_trajectory_follow_the_schedule():
    recorder = Recorder(lambda z, sigma: torch.zeros_like(z))
    noise = noise_for_seeds(range(3), SHAPE)
    x, trajectory = heun_sample(recorder, noise, num_steps=5, return_trajectory=True)
    sigmas = karras_sigmas(5)
    # Heun: the step's start, then its end for every step but the last (Euler to sigma = 0).
    expected = [sigmas[0]] + [level for level in sigmas[1:-1] for _ in (0, 1)]
    assert recorder.sigmas == pytest.approx([float(level) for level in expected], rel=1e-6)
    assert trajectory.shape == (6, 3, *SHAPE)
    assert torch.equal(trajectory[0], (noise.double() * 80.0).float()) and torch.equal(trajectory[-1], x)
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-6)  # D = 0 pulls every trajectory to 0

    euler_recorder = Recorder(lambda z, sigma: torch.zeros_like(z))
    euler_sample(euler_recorder, noise, sigmas=[10.0, 1.0, 0.5])
    assert euler_recorder.sigmas == [10.0, 1.0]


def test_churn_is_reproducible_and_uses_the_generator(network):
    noise = noise_for_seeds(range(4), SHAPE)
    churned = [heun_sample(network, noise, num_steps=6, s_churn=10.0, generator=torch.Generator().manual_seed(5))
               for _ in range(2)]
    assert torch.equal(churned[0], churned[1])
    other_seed = heun_sample(network, noise, num_steps=6, s_churn=10.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(churned[0], other_seed)
    assert not torch.equal(churned[0], heun_sample(network, noise, num_steps=6))


# ------------------------------------------------------------------------------------- memorisation
def test_heun_with_exact_estimator_ends_on_training_images(tiny_store):
    """Integrating the PF-ODE with the exact posterior mean reproduces the training set (Section 6)."""
    exact = make_estimator("exact", tiny_store)
    samples = heun_sample(exact, noise_for_seeds(range(32), SHAPE), num_steps=18)
    assert samples.shape == (32, *SHAPE)
    assert bool((distance_to_data(samples, tiny_store) < 1e-3).all())


def test_heun_with_knn_estimator_ends_on_training_images(tiny_store, knn):
    samples = heun_sample(estimator_denoiser(knn, torch.Generator().manual_seed(0)),
                          noise_for_seeds(range(32), SHAPE), num_steps=18)
    assert (distance_to_data(samples, tiny_store) < 1e-3).float().mean().item() >= 0.9


# ------------------------------------------------------------------------------------------- hybrid
@pytest.mark.parametrize("t_switch", [80.0, 1000.0, math.inf])
def test_hybrid_with_t_switch_at_or_above_T_is_network_sampling(tiny_store, network, t_switch):
    noise = noise_for_seeds(range(4), SHAPE)
    exact = Recorder(make_estimator("exact", tiny_store))
    hybrid = hybrid_sample(exact, network, noise, t_switch, num_steps=6)
    assert torch.equal(hybrid, heun_sample(network, noise, num_steps=6)) and exact.sigmas == []


def test_hybrid_with_t_switch_zero_is_estimator_sampling(tiny_store, network, knn):
    noise = noise_for_seeds(range(4), SHAPE)
    exact = make_estimator("exact", tiny_store)
    assert torch.equal(hybrid_sample(exact, network, noise, 0.0, num_steps=6), heun_sample(exact, noise, num_steps=6))
    seeded = lambda: torch.Generator().manual_seed(3)
    hybrid = hybrid_sample(knn, network, noise, 0.0, num_steps=6, generator=seeded())
    assert torch.equal(hybrid, heun_sample(estimator_denoiser(knn, seeded()), noise, num_steps=6))


def test_hybrid_switches_denoiser_at_t_switch(tiny_store, network):
    t_switch, num_steps = 2.0, 6
    estimator, net = Recorder(make_estimator("exact", tiny_store)), Recorder(network)
    hybrid_sample(estimator, net, noise_for_seeds(range(2), SHAPE), t_switch, num_steps=num_steps)
    # t_switch is inserted: one more step, so 2 (S + 1) - 1 evaluations in total.
    assert len(estimator.sigmas) + len(net.sigmas) == 2 * (num_steps + 1) - 1
    assert min(estimator.sigmas) == pytest.approx(t_switch) and max(net.sigmas) == pytest.approx(t_switch)
    assert all(sigma >= t_switch for sigma in estimator.sigmas) and all(sigma <= t_switch for sigma in net.sigmas)


def test_switch_and_tail_schedules():
    sigmas = karras_sigmas(6)
    inserted = switch_schedule(sigmas, 2.0)
    assert inserted.numel() == 8 and 2.0 in inserted.tolist() and bool((inserted[1:] < inserted[:-1]).all())
    assert torch.equal(switch_schedule(sigmas, float(sigmas[2])), sigmas)  # already a level
    assert torch.equal(switch_schedule(sigmas, 80.0), sigmas) and torch.equal(switch_schedule(sigmas, 0.0), sigmas)
    tail = tail_schedule(sigmas, 2.0)
    assert tail[0].item() == 2.0 and torch.equal(tail[1:], sigmas[sigmas < 2.0])
    assert torch.equal(tail, inserted[inserted <= 2.0])  # the hybrid's network part


# ---------------------------------------------------------------------------------- forward process
def test_forward_process_sample_tiny_t_switch_returns_training_images(tiny_store, network):
    samples, indices = forward_process_sample(tiny_store, network, 1e-4, 16, generator=torch.Generator().manual_seed(0),
                                              return_indices=True)
    assert samples.shape == (16, *SHAPE) and samples.dtype == torch.float32
    assert (samples - tiny_store.float(indices)).abs().max().item() < 1e-3
    at_zero, zero_indices = forward_process_sample(tiny_store, network, 0.0, 4, return_indices=True)
    assert torch.equal(at_zero, tiny_store.float(zero_indices))


def test_forward_process_sample_is_reproducible_and_uses_the_schedule_tail(tiny_store, network):
    recorder = Recorder(network)
    sample = lambda seed: forward_process_sample(tiny_store, recorder, 2.0, 8, num_steps=6,
                                                 generator=torch.Generator().manual_seed(seed))
    runs = [sample(1), sample(1)]
    assert torch.equal(runs[0], runs[1])
    recorder.sigmas.clear()
    runs.append(sample(2))
    assert not torch.equal(runs[0], runs[2])
    tail = tail_schedule(karras_sigmas(6), 2.0)
    assert recorder.sigmas[0] == pytest.approx(2.0) and len(recorder.sigmas) == 2 * (tail.numel() - 1) - 1


# -------------------------------------------------------------------------------------- consistency
def test_consistency_sampling_reinjects_noise_and_counts_evaluations():
    fixed = torch.full((3, *SHAPE), 0.25)
    calls = []

    def consistency_fn(z, sigma):
        calls.append((z.clone(), sigma.clone()))
        return fixed.clone()

    noise = noise_for_seeds(range(3), SHAPE)
    sample = consistency_sample(consistency_fn, noise, sigmas=(80.0, 0.821), sigma_min=0.002,
                                generator=torch.Generator().manual_seed(4))
    assert len(calls) == 2 and torch.equal(sample, fixed)
    assert torch.equal(calls[0][0], (noise.double() * 80.0).float()) and bool((calls[0][1] == 80.0).all())
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(4))
    expected = fixed.double() + math.sqrt(0.821**2 - 0.002**2) * eps.double()
    assert torch.allclose(calls[1][0].double(), expected, atol=1e-6) and bool((calls[1][1] == 0.821).all())

    calls.clear()
    consistency_sample(consistency_fn, noise)
    assert len(calls) == 1


def test_multistep_consistency_clamps_each_denoised_estimate():
    # f jumps outside the data range at the first step and is the identity afterwards, so the second step
    # returns the re-noised first estimate: clamped first (the reference sampler's clip_denoised), or not.
    def consistency_fn(z, sigma):
        return torch.full_like(z, 3.0) if float(sigma[0]) > 1 else z

    noise = noise_for_seeds(range(2), SHAPE)
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(4)).double()
    scale = math.sqrt(0.5**2 - 0.002**2)
    clipped = consistency_sample(consistency_fn, noise, sigmas=(80.0, 0.5), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(clipped, (1.0 + scale * eps).clamp(-1, 1).float())
    raw = consistency_sample(consistency_fn, noise, sigmas=(80.0, 0.5), generator=torch.Generator().manual_seed(4),
                             clip_denoised=False)
    torch.testing.assert_close(raw, (3.0 + scale * eps).float())
    assert float(consistency_sample(consistency_fn, noise).max()) == 1.0
    sampler = make_sampler("consistency", network=consistency_fn, sigmas=(80.0, 0.5), clip_denoised=False)
    torch.testing.assert_close(sampler(noise, torch.Generator().manual_seed(4)), raw)
    with pytest.raises(ValueError, match="clip_denoised"):
        consistency_sample(consistency_fn, noise, clip_denoised="no")


def test_consistency_two_step_is_reproducible_with_cm_precond(song_unet):
    consistency = CMPrecond(song_unet, sigma_min=0.002).eval()
    noise = noise_for_seeds(range(4), SHAPE)
    runs = [consistency_sample(consistency, noise, sigmas=(80.0, 0.821), generator=torch.Generator().manual_seed(2))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # The boundary f(z, sigma_min) = z: a last step at sigma_min re-injects no noise and returns the input.
    boundary = consistency_sample(consistency, noise, sigmas=(80.0, 0.002), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(boundary, consistency_sample(consistency, noise), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigmas": (0.821, 80.0)}, "descending"), ({"sigmas": (80.0, 0.001)}, "sigma_min"),
    ({"sigmas": ()}, "at least one"), ({"sigma_min": 0.0}, "sigma_min"),
])  # fmt: skip
def test_consistency_sample_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        consistency_sample(lambda z, sigma: z, noise_for_seeds([0], SHAPE), **kwargs)
    with pytest.raises(ValueError, match="4-D"):
        consistency_sample(lambda z, sigma: z, torch.zeros(4, 4))


# -------------------------------------------------------------------------------- seeds, determinism
def test_noise_for_seeds_is_per_sample():
    everything = noise_for_seeds(range(8), SHAPE)
    assert everything.shape == (8, *SHAPE) and everything.dtype == torch.float32
    assert torch.equal(noise_for_seeds([3, 7], SHAPE), everything[[3, 7]])
    assert torch.equal(everything[0], torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))
    for seeds, shape, match in (([], SHAPE, "empty"), ([-1], SHAPE, "seeds"), ([0.5], SHAPE, "seeds"),
                                ([0], (4, 4), "shape")):
        with pytest.raises(ValueError, match=match):
            noise_for_seeds(seeds, shape)


def test_sampling_twice_with_the_same_seeds_is_identical(network, knn):
    noise = lambda: noise_for_seeds(range(4), SHAPE)
    assert torch.equal(heun_sample(network, noise(), num_steps=6), heun_sample(network, noise(), num_steps=6))
    knn_runs = [heun_sample(estimator_denoiser(knn, torch.Generator().manual_seed(9)), noise(), num_steps=6)
                for _ in range(2)]
    assert torch.equal(knn_runs[0], knn_runs[1])


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps"), ({"sigma_min": 0.0}, "sigma_min"), ({"sigma_max": 0.001}, "sigma_max"),
    ({"rho": -1.0}, "rho"), ({"sigmas": [1.0, 2.0, 0.0]}, "descending"), ({"sigmas": [1.0]}, "at least 2"),
    ({"sigmas": [1.0, -0.5]}, ">= 0"), ({"s_churn": -1.0}, "s_churn"),
])  # fmt: skip
@pytest.mark.parametrize("sampler", [heun_sample, euler_sample])
def test_samplers_reject_bad_arguments(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler(lambda z, sigma: z, noise_for_seeds([0], SHAPE), **kwargs)


def test_bad_noise_t_switch_and_denoiser_output(tiny_store, network):
    exact = make_estimator("exact", tiny_store)
    with pytest.raises(ValueError, match="4-D"):
        heun_sample(network, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="t_switch"):
        hybrid_sample(exact, network, noise_for_seeds([0], SHAPE), -1.0)
    for bad_t_switch in (-0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="t_switch"):
            forward_process_sample(tiny_store, network, bad_t_switch, 4)
    with pytest.raises(ValueError, match="num_samples"):
        forward_process_sample(tiny_store, network, 1.0, 0)
    with pytest.raises(ValueError, match="shape"):
        heun_sample(lambda z, sigma: z[:, :, :2], noise_for_seeds([0], SHAPE))
