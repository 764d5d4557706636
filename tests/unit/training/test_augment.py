"""EDM's augmentation pipe (knn_cm/training/augment.py), its targets, and EDM training with its labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from knn_cm.data import load_digits
from knn_cm.estimators import make_estimator
from knn_cm.models import EDMPrecond, SongUNet
from knn_cm.search import build_index
from knn_cm.training import EDMObjective, StepRandom
from knn_cm.training.augment import EDM_CIFAR10, AugmentPipe

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(batch=64, channels=3, size=8, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def only(name, p=1.0, **kwargs):
    return AugmentPipe(p=p, **{name: 1.0}, **kwargs)


def test_edm_cifar10_label_layout():
    pipe = AugmentPipe(**EDM_CIFAR10)
    assert pipe.label_dim == 9
    assert pipe.label_slices() == {"xflip": slice(0, 1), "yflip": slice(1, 2), "scale": slice(2, 3),
                                   "rotate_frac": slice(3, 5), "aniso": slice(5, 7), "translate_frac": slice(7, 9)}
    every = AugmentPipe(p=0.5, xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1,
                        translate_frac=1)
    assert every.label_dim == 13 and list(every.label_slices()) == ["xflip", "yflip", "rotate_int", "translate_int",
                                                                  "scale", "rotate_frac", "aniso", "translate_frac"]
    config = OmegaConf_load("configs/train/augment/edm_cifar10.yaml")
    assert instantiate(config).label_dim == 9 and config.p == 0.12


def OmegaConf_load(path):
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / path)


def test_p_zero_is_the_identity_with_zero_labels():
    x = images()
    out, labels = AugmentPipe(p=0.0, **{k: v for k, v in EDM_CIFAR10.items() if k != "p"})(x, torch.Generator())
    assert torch.equal(out, x) and labels.shape == (64, 9) and not bool(labels.any())


def test_xflip_label_one_is_exactly_the_mirror_image():
    x = images()
    out, labels = only("xflip")(x, torch.Generator().manual_seed(1))
    flipped = labels[:, 0] == 1
    assert 10 < int(flipped.sum()) < 54  # w is a fair coin once the transform is applied
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])
    out, labels = only("yflip")(x, torch.Generator().manual_seed(1))
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], x[flipped].flip(2)) and torch.equal(out[~flipped], x[~flipped])


def test_integer_rotation_labels_name_quarter_turns():
    x = images()
    out, labels = only("rotate_int")(x, torch.Generator().manual_seed(2))
    turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for i in range(x.shape[0]):
        count = turns[(int(labels[i, 0]), int(labels[i, 1]))]
        seen.add(count)
        assert torch.equal(out[i], torch.rot90(x[i], count, dims=(1, 2)))  # counter-clockwise quarter turns
    assert seen == {0, 1, 2, 3}


def test_integer_translation_moves_pixels_exactly_with_reflect_padding():
    x = images(size=16)
    pipe = only("translate_int")
    out, labels = pipe(x, torch.Generator().manual_seed(3))
    shifts = (labels * 16 * pipe.translate_int_max).round().long()  # labels are tx / (W max), ty / (H max)
    assert torch.allclose(labels * 16 * pipe.translate_int_max, shifts.float(), atol=1e-5) and bool(shifts.any())
    reflect = lambda i: abs(i) if i < 0 else (30 - i if i > 15 else i)
    for b in range(x.shape[0]):
        tx, ty = int(shifts[b, 0]), int(shifts[b, 1])
        for row in range(16):
            for column in range(16):  # content moves right by tx and up by ty
                assert torch.equal(out[b, :, row, column], x[b, :, reflect(row + ty), reflect(column - tx)])


def test_general_transforms_match_their_labels():
    x = images(size=9)
    # Fractional rotation by theta = atan2(sin, cos - 1 + 1): a quarter turn reads pixels exactly.
    pipe = only("rotate_frac")
    quarter = pipe._resample(x[:1], _inverse_rotation(math.pi / 2), torch.tensor([True]))
    assert torch.allclose(quarter, torch.rot90(x[:1], 1, dims=(2, 3)), atol=1e-5)
    out, labels = pipe(x, torch.Generator().manual_seed(4))
    theta = torch.atan2(labels[:, 1], labels[:, 0] + 1).double()
    expected = torch.cat([pipe._resample(x[i : i + 1], _inverse_rotation(float(theta[i])), torch.tensor([True]))
                          for i in range(x.shape[0])])
    assert torch.allclose(out, expected, atol=1e-5)
    # Isotropic scale s = 2^(0.2 w), label w: the centre pixel of an odd-sized image stays where it is.
    pipe = only("scale")
    out, labels = pipe(x, torch.Generator().manual_seed(5))
    assert bool((labels[:, 0] != 0).all()) and torch.allclose(out[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5)
    inverse_scale = torch.exp2(-0.2 * labels[:, 0].double())
    assert_resampled(pipe, x, out, [torch.diag(torch.stack([v, v, torch.ones(())])) for v in inverse_scale])
    # Fractional translation by (w0 W 0.125, w1 H 0.125) pixels (right, up), labels [w0, w1].
    pipe = only("translate_frac")
    out, labels = pipe(x, torch.Generator().manual_seed(6))
    shifts = labels.double() * 9 * 0.125
    assert_resampled(pipe, x, out, [torch.tensor([[1, 0, -a], [0, 1, -b], [0, 0, 1]], dtype=torch.float64)
                                    for a, b in shifts.tolist()])
    # Anisotropic scaling 2^(0.2 w) along angle r, labels [w cos r, w sin r]: the label gives |w| and r up to
    # a half turn, so the image is one of the two maps it allows (EDM's layout has this ambiguity).
    pipe = only("aniso")
    out, labels = pipe(x, torch.Generator().manual_seed(9))
    for i in range(x.shape[0]):
        size, angle = float(labels[i].norm()), math.atan2(float(labels[i, 1]), float(labels[i, 0]))
        candidates = [pipe._resample(x[i : i + 1], _inverse_aniso(w, angle), torch.tensor([True]))
                      for w in (size, -size)]
        assert any(torch.allclose(out[i : i + 1], c, atol=1e-5) for c in candidates)
    # With probability p * multiplier: at p 0.12 about 12% of the images get each transform, labels 0 elsewhere.
    _, labels = AugmentPipe(**EDM_CIFAR10)(images(4000, 1, 4), torch.Generator().manual_seed(7))
    applied = (labels[:, 2] != 0).float().mean()
    assert 0.10 < float(applied) < 0.14 and 0.45 < float(labels[:, 0].mean()) < 0.55


def assert_resampled(pipe, x, out, inverse_maps):
    for i, inverse_map in enumerate(inverse_maps):
        expected = pipe._resample(x[i : i + 1], inverse_map.reshape(1, 3, 3), torch.tensor([True]))
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)


def _inverse_aniso(w, r):
    s = 2 ** (0.2 * w)
    rotate = lambda a: torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]],
                                    dtype=torch.float64)
    return (rotate(r) @ torch.diag(torch.tensor([1 / s, s, 1.0], dtype=torch.float64)) @ rotate(-r)).reshape(1, 3, 3)


def _inverse_rotation(theta):
    cos, sin = math.cos(-theta), math.sin(-theta)
    return torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def test_pipe_is_reproducible_and_rejects_bad_settings():
    x = images()
    pipe = AugmentPipe(**EDM_CIFAR10)
    first = pipe(x, torch.Generator().manual_seed(8))
    second = pipe(x, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="augment p"):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match="multiplier scale"):
        AugmentPipe(scale=-1)


# ------------------------------------------------------------------------------------------------ targets
@pytest.fixture(scope="module")
def digits():
    return load_digits()


def brute_force_posterior_mean(z, sigma, candidates):
    """E[y | z] over candidate images [N, ...] with a uniform prior, in float64."""
    z = z.reshape(z.shape[0], -1).double()
    rows = candidates.reshape(candidates.shape[0], -1).double()
    log_weights = -torch.cdist(z, rows).square() / (2 * sigma.double().reshape(-1, 1) ** 2)
    return (torch.softmax(log_weights, dim=1) @ rows).reshape(z.shape[0], *candidates.shape[1:])


def test_knn_target_is_the_posterior_mean_over_the_flipped_data(digits):
    # Flips and quarter turns: the target equals the exact posterior over {T x_i} computed by brute force.
    pipe = AugmentPipe(p=1.0, xflip=1, yflip=1, rotate_int=1)
    x = digits.float(torch.arange(0, 1797, 60))
    augmented, augmentation = pipe.augment(x, torch.Generator().manual_seed(0))
    sigma = torch.full((x.shape[0],), 1.5)
    z = augmented + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    exact = make_estimator("exact", digits, dtype=torch.float64)
    target, stats = exact.augmented_target(pipe, augmentation, z, sigma, augmented)
    assert stats["augment_source_targets"] == 0.0
    data = digits.float(torch.arange(len(digits)))
    for i in range(x.shape[0]):
        single = type(augmentation)(**{k: getattr(augmentation, k)[i : i + 1]
                                       for k in augmentation.__dataclass_fields__})
        transformed = _apply_each(single, data)  # T_i applied to every data image
        reference = brute_force_posterior_mean(z[i : i + 1], sigma[i : i + 1], transformed)
        assert torch.allclose(target[i : i + 1].double(), reference, atol=1e-5)
    # The unaugmented posterior mean is a different, wrong target wherever the transform moved pixels.
    plain = exact(z, sigma)
    moved = augmentation.xflip | augmentation.yflip | (augmentation.quarter_turns > 0)
    assert float((plain[moved] - target[moved]).abs().max()) > 0.1
    knn = make_estimator("knn", digits, index=build_index(digits, "flat"), k=256, n=64)
    knn_target, _ = knn.augmented_target(pipe, augmentation, z, sigma, augmented, torch.Generator().manual_seed(2))
    assert float((knn_target - target).square().mean()) < 0.1 * float((plain - target).square().mean())


def _apply_each(single, data):
    expanded = type(single)(**{k: getattr(single, k).expand(data.shape[0], *getattr(single, k).shape[1:])
                               for k in single.__dataclass_fields__})
    return expanded.apply_orthogonal(data)


def test_resampled_images_get_their_augmented_source_and_stf_augments_its_reference(digits):
    pipe = AugmentPipe(**EDM_CIFAR10)
    x = digits.float(torch.arange(32))
    augmented, augmentation = pipe.augment(x, torch.Generator().manual_seed(3))
    sigma = torch.full((32,), 2.0)
    z = augmented + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    knn = make_estimator("knn", digits, index=build_index(digits, "flat"), k=64, n=16)
    target, stats = knn.augmented_target(pipe, augmentation, z, sigma, augmented, torch.Generator().manual_seed(5))
    resampled = ~augmentation.orthogonal_only
    assert bool(resampled.any()) and torch.equal(target[resampled], augmented[resampled])
    assert stats["augment_source_targets"] == pytest.approx(float(resampled.float().mean()))
    single, _ = make_estimator("single").augmented_target(pipe, augmentation, z, sigma, augmented)
    assert torch.equal(single, augmented)
    # STF with p = 0 is the STF estimator itself (same draws); with p > 0 its reference images are augmented.
    for variant, n in (("per_sample", 16), ("shared", 48)):
        stf = make_estimator("stf", digits, n=n, variant=variant)
        identity = AugmentPipe(p=0.0, **{k: v for k, v in EDM_CIFAR10.items() if k != "p"})
        plain = stf(z, sigma, x=augmented, generator=torch.Generator().manual_seed(6))
        same, _ = stf.augmented_target(identity, augmentation, z, sigma, augmented, torch.Generator().manual_seed(6))
        assert torch.equal(same, plain)  # one implementation of STF's average (STF.mean_with_sources)
        other, _ = stf.augmented_target(AugmentPipe(p=1.0, xflip=1, yflip=1), augmentation, z, sigma, augmented,
                                        torch.Generator().manual_seed(6))
        assert not torch.allclose(other, plain)
    with pytest.raises(ValueError, match="'network' estimator has no target under augmentation"):
        make_estimator("network", denoiser=lambda z, s: z).augmented_target(pipe, augmentation, z, sigma, augmented)


def test_the_rule_follows_the_estimator_class_not_its_name(digits):
    """The rule is the estimator's own method (Estimator.augmented_target): a subclass inherits its base's rule
    whatever it is called, and a class that borrows the name "single" gets the dataset estimators' rule (its
    estimate in the unaugmented frame), not the single-sample estimator's augmented source."""
    from knn_cm.estimators import KNN, Estimator

    pipe = AugmentPipe(p=1.0, xflip=1, yflip=1, rotate_int=1)
    x = digits.float(torch.arange(8))
    augmented, augmentation = pipe.augment(x, torch.Generator().manual_seed(0))
    sigma = torch.full((8,), 1.5)
    z = augmented + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    class RenamedKNN(KNN):
        name = "my_knn"

    index = build_index(digits, "flat")
    renamed = RenamedKNN(digits, index=index, k=64, n=16)
    plain = make_estimator("knn", digits, index=index, k=64, n=16)
    target, stats = renamed.augmented_target(pipe, augmentation, z, sigma, augmented, torch.Generator().manual_seed(2))
    expected, _ = plain.augmented_target(pipe, augmentation, z, sigma, augmented, torch.Generator().manual_seed(2))
    assert torch.equal(target, expected) and stats["augment_source_targets"] == 0.0

    class Impostor(Estimator):  # says "single" but is not the single-sample estimator
        name = "single"

        def posterior_mean(self, z, sigma, x, generator):
            return torch.zeros_like(z)

    impostor, stats = Impostor(digits).augmented_target(pipe, augmentation, z, sigma, augmented)
    assert torch.equal(impostor, torch.zeros_like(z)) and stats["augment_source_targets"] == 0.0


# ------------------------------------------------------------------------------------------- EDM training
TINY = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[], dropout=0.0)


def test_edm_objective_passes_labels_and_checks_augment_dim(digits):
    network = EDMPrecond(SongUNet(**TINY, augment_dim=9))
    seen = []

    class Wrapped(torch.nn.Module):  # a stand-in for DDP's wrapper: the network is its .module
        def __init__(self):
            super().__init__()
            self.module = network

        def forward(self, z, sigma, **kwargs):
            seen.append(kwargs)
            return self.module(z, sigma, **kwargs)

    objective = EDMObjective(make_estimator("single"), augment=dict(EDM_CIFAR10))
    loss, _ = objective(Wrapped(), digits.float(torch.arange(16)), 0, StepRandom.seeded(0))
    assert torch.isfinite(loss) and seen[0]["augment_labels"].shape == (16, 9)
    with pytest.raises(ValueError, match="augment_dim=9"):
        plain = EDMPrecond(SongUNet(**TINY))
        EDMObjective(make_estimator("single"), augment=dict(EDM_CIFAR10))(plain, digits.float(torch.arange(4)), 0,
                                                                          StepRandom.seeded(0))
    # Sampling passes no labels, which is the network with zero labels (map_augment has no bias).
    z, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0)
    torch.testing.assert_close(network(z, sigma), network(z, sigma, augment_labels=torch.zeros(4, 9)))


def test_edm_experiments_resolve_the_augmentation():
    for experiment in ("edm", "edm_stf", "edm_knn"):
        with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
            config = compose(config_name="train", overrides=[f"experiment={experiment}", "run_name=x"])
        pipe = instantiate(config.trainer.objective.augment)
        assert pipe.p == 0.12 and pipe.label_dim == 9 == config.model.network.augment_dim
        assert config.dataset.xflip is False  # the pipe's labelled x-flips replace the dataset's
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        digits_edm = compose(config_name="train", overrides=["experiment=digits_edm", "run_name=x"])
    assert digits_edm.trainer.objective.augment is None
