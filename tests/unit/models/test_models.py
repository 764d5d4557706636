"""SongUNet / preconditioning tests: EDM layout and numbers, CM boundary, shared dropout, configs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from knn_cm.models import (
    CMPrecond,
    EDMPrecond,
    GroupNorm,
    SongUNet,
    build_denoiser,
    draw_dropout_seed,
    resolve_amp_dtype,
    shared_dropout,
    shared_dropout_active,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "train"  # the model group is train.py's
ARCHS = ("ddpmpp", "ncsnpp")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_kwargs(**overrides) -> dict:
    """A ~10k-parameter SongUNet on 8x8 RGB images with attention at 4x4."""
    kwargs = dict(
        img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2],
        channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace all parameters by N(0, 0.2^2) values so near-zero initialisations do not hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


def reference_layout(arch: str) -> dict:
    return json.loads((FIXTURES / f"edm_cifar10_{arch}.json").read_text())


def apply_variant(entries: list, variant: dict) -> list:
    """The reference [name, shape] list changed as a JSON ``variants`` entry describes."""
    removed = {name for name, _ in variant["removed_entries"]}
    entries = [entry for entry in entries if entry[0] not in removed]
    for name, shape, index in sorted(variant["added_entries"], key=lambda entry: entry[2]):
        entries.insert(index, [name, shape])
    return entries


# ------------------------------------------------------------------------------------------------
# EDM layout: names, shapes, order and parameter counts.


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", [None, "augment_dim=0", "label_dim=10 (class-conditional, e.g. cifar10 cond)"])
def test_state_dict_matches_edm_layout(arch, variant):
    layout = reference_layout(arch)
    kwargs = dict(layout["songunet_kwargs"])
    expected = layout["state_dict"]
    total_params = layout["total_params"]
    if variant is not None:
        kwargs.update({"augment_dim=0": {"augment_dim": 0}}.get(variant, {"label_dim": 10}))
        expected = apply_variant(expected, layout["variants"][variant])
        total_params = layout["variants"][variant]["total_params"]
    with torch.device("meta"):
        denoiser = EDMPrecond(SongUNet(**kwargs))
    got = [[name, list(tensor.shape)] for name, tensor in denoiser.state_dict().items()]
    assert got == expected
    assert sum(parameter.numel() for parameter in denoiser.parameters()) == total_params
    buffers = [name for name, _ in denoiser.named_buffers()]
    assert sorted(buffers) == sorted(layout["buffers"])


# ------------------------------------------------------------------------------------------------
# EDM numbers: the fixtures hold EDM's own outputs for tiny networks.


@pytest.mark.parametrize("arch", ARCHS)
def test_reproduces_edm_outputs(arch):
    fixture = torch.load(FIXTURES / f"edm_tiny_{arch}.pt", weights_only=True)
    denoiser = EDMPrecond(SongUNet(**fixture["config"]["songunet_kwargs"]))
    denoiser.load_state_dict(fixture["state_dict"], strict=True)
    denoiser.eval()
    x, sigma = fixture["x"], fixture["sigma"]
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
        raw = denoiser.model(c_in * x, c_noise)
        denoised = denoiser(x, sigma)
    torch.testing.assert_close(c_noise, fixture["c_noise"], atol=1e-7, rtol=0)
    assert (raw - fixture["raw"]).abs().max().item() <= 1e-5
    assert (denoised - fixture["denoised"]).abs().max().item() <= 1e-5


BRANCH_FIXTURES = ("skip_skip", "conditional", "positional_noise2_r16", "residual_decskip_gray")


@pytest.mark.parametrize("name", BRANCH_FIXTURES)
def test_reproduces_edm_outputs_for_other_branches(name):
    """Skip encoder/decoder, class + augment labels, positional noise x2 at 16x16, 1-channel residual/skip.

    Outputs of a local transcription of EDM's networks.py (see fixtures/README.md).
    """
    fixture = torch.load(FIXTURES / f"edm_tiny_{name}.pt", weights_only=True)
    denoiser = EDMPrecond(SongUNet(**fixture["config"]["songunet_kwargs"]))
    assert list(denoiser.state_dict()) == list(fixture["state_dict"])
    denoiser.load_state_dict(fixture["state_dict"], strict=True)
    denoiser.eval()
    x, sigma = fixture["x"], fixture["sigma"]
    labels = dict(class_labels=fixture["class_labels"], augment_labels=fixture["augment_labels"])
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
        raw = denoiser.model(c_in * x, c_noise, **labels)
        denoised = denoiser(x, sigma, **labels)
    torch.testing.assert_close(c_noise, fixture["c_noise"], atol=1e-7, rtol=0)
    assert (raw - fixture["raw"]).abs().max().item() <= 1e-5
    assert (denoised - fixture["denoised"]).abs().max().item() <= 1e-5


def test_single_label_row_applies_to_whole_batch():
    """As in EDM, class labels [label_dim] or [1, label_dim] (and augment labels [1, dim]) broadcast."""
    torch.manual_seed(0)
    denoiser = randomize_(EDMPrecond(SongUNet(**tiny_kwargs(label_dim=4, augment_dim=2)))).eval()
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.2, 1.0, 5.0])
    label, augment = torch.eye(4)[1], torch.randn(1, 2)
    with torch.no_grad():
        expected = denoiser(x, sigma, class_labels=label.expand(3, 4), augment_labels=augment.expand(3, 2))
        for row in (label, label[None]):
            torch.testing.assert_close(denoiser(x, sigma, class_labels=row, augment_labels=augment), expected)
    with pytest.raises(ValueError, match="class_labels"):
        denoiser(x, sigma, class_labels=torch.eye(4)[:2])


def test_zero_blocks_per_level_builds_like_edm():
    """num_blocks=0 is valid in EDM: one decoder block per level (with attention where requested)."""
    model = SongUNet(**tiny_kwargs(num_blocks=0))
    assert [name for name in model.dec if "block" in name] == ["4x4_block0", "8x8_block0"]
    assert model.dec["4x4_block0"].num_heads == 1 and not any("block" in name for name in model.enc)
    assert model(torch.randn(2, 3, 8, 8), torch.zeros(2)).shape == (2, 3, 8, 8)


def test_edm_coefficients_match_formulas():
    denoiser = EDMPrecond(SongUNet(**tiny_kwargs()), sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
    for index, value in enumerate(sigma.tolist()):
        assert c_skip[index].item() == pytest.approx(0.25 / (value**2 + 0.25), rel=1e-6)
        assert c_out[index].item() == pytest.approx(value * 0.5 / math.sqrt(value**2 + 0.25), rel=1e-6)
        assert c_in[index].item() == pytest.approx(1 / math.sqrt(value**2 + 0.25), rel=1e-6)
        assert c_noise[index].item() == pytest.approx(math.log(value) / 4, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Consistency-model parameterisation.


def test_cm_boundary_condition_is_exact():
    torch.manual_seed(0)
    denoiser = randomize_(CMPrecond(SongUNet(**tiny_kwargs()), sigma_min=0.002)).eval()
    z = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        at_boundary = denoiser(z, torch.full([4], 0.002))
        above = denoiser(z, torch.full([4], 0.5))
    assert torch.equal(at_boundary, z)
    assert not torch.allclose(above, z, atol=1e-3)


def test_cm_coefficients_and_noise_scale():
    model = SongUNet(**tiny_kwargs())
    sigma = torch.tensor([0.002, 1.0, 80.0])
    sd, sigma_min = 0.5, 0.002
    for scale in (0.25, 1000 * 0.25):
        c_skip, c_out, c_in, c_noise = CMPrecond(model, sigma_min=sigma_min, c_noise_scale=scale).coefficients(sigma)
        for index, value in enumerate(sigma.tolist()):
            assert c_skip[index].item() == pytest.approx(sd**2 / ((value - sigma_min) ** 2 + sd**2), rel=1e-6)
            expected_c_out = (value - sigma_min) * sd / math.sqrt(sd**2 + value**2)
            assert c_out[index].item() == pytest.approx(expected_c_out, abs=1e-7)
            assert c_in[index].item() == pytest.approx(1 / math.sqrt(value**2 + sd**2), rel=1e-6)
            assert c_noise[index].item() == pytest.approx(scale * math.log(value), rel=1e-5)


def test_wrappers_share_keys_and_signature():
    model = SongUNet(**tiny_kwargs())
    edm, cm = EDMPrecond(model), CMPrecond(model)
    assert list(edm.state_dict()) == list(cm.state_dict())
    assert all(name.startswith("model.") for name in edm.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for denoiser in (edm, cm):
        assert denoiser(x, torch.tensor([0.3, 2.0]), class_labels=None, augment_labels=None).shape == x.shape


def test_scalar_sigma_broadcasts():
    denoiser = randomize_(EDMPrecond(SongUNet(**tiny_kwargs()))).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = denoiser(x, torch.full([3], 0.7))
        for sigma in (0.7, torch.tensor(0.7), torch.tensor([0.7])):
            torch.testing.assert_close(denoiser(x, sigma), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [torch.tensor([0.5, 0.0]), torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.2, 0.3])])
def test_bad_sigma_is_rejected(sigma):
    denoiser = CMPrecond(SongUNet(**tiny_kwargs()))
    with pytest.raises(ValueError, match="sigma"):
        denoiser(torch.randn(2, 3, 8, 8), sigma)


# ------------------------------------------------------------------------------------------------
# Forward and backward on CPU for small networks and every encoder/decoder/embedding type.


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
@pytest.mark.parametrize("decoder_type", ["standard", "skip"])
def test_all_songunet_types_forward_backward(embedding_type, encoder_type, decoder_type):
    torch.manual_seed(0)
    kwargs = tiny_kwargs(
        embedding_type=embedding_type, encoder_type=encoder_type, decoder_type=decoder_type,
        channel_mult_noise=2 if embedding_type == "fourier" else 1, channel_mult=[1, 2, 2],
        resample_filter=[1, 3, 3, 1] if encoder_type == "residual" else [1, 1], dropout=0.1,
    )  # fmt: skip
    denoiser = EDMPrecond(SongUNet(**kwargs)).train()
    names = list(denoiser.state_dict())
    assert any("aux_skip" in name for name in names) == (encoder_type == "skip")
    assert any("aux_down" in name for name in names) == (encoder_type == "skip")
    assert any("aux_residual" in name for name in names) == (encoder_type == "residual")
    assert any("aux_up" in name for name in names) == (decoder_type == "skip")
    x = torch.randn(4, 3, 8, 8)
    out = denoiser(x, torch.tensor([0.01, 0.3, 2.0, 40.0]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, parameter in denoiser.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_class_and_augment_conditioning():
    torch.manual_seed(0)
    model = SongUNet(**tiny_kwargs(label_dim=4, augment_dim=9))
    denoiser = randomize_(EDMPrecond(model)).eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 1.5])
    labels = torch.eye(4)[:2]
    with torch.no_grad():
        no_labels = denoiser(x, sigma)
        zero_labels = denoiser(x, sigma, class_labels=torch.zeros(2, 4))
        with_labels = denoiser(x, sigma, class_labels=labels)
        with_augment = denoiser(x, sigma, class_labels=labels, augment_labels=torch.randn(2, 9))
    torch.testing.assert_close(no_labels, zero_labels)
    assert not torch.allclose(with_labels, zero_labels)
    assert not torch.allclose(with_augment, with_labels)
    with pytest.raises(ValueError, match="class_labels"):
        SongUNet(**tiny_kwargs())(x, sigma, class_labels=labels)


def test_label_dropout_drops_whole_label_in_training_only():
    torch.manual_seed(0)
    model = randomize_(SongUNet(**tiny_kwargs(label_dim=4, label_dropout=1.0)))
    x, noise_labels, labels = torch.randn(2, 3, 8, 8), torch.zeros(2), torch.eye(4)[:2]
    with torch.no_grad():
        dropped = model.train()(x, noise_labels, class_labels=labels)
        unlabelled = model.train()(x, noise_labels, class_labels=torch.zeros(2, 4))
        kept = model.eval()(x, noise_labels, class_labels=labels)
    torch.testing.assert_close(dropped, unlabelled)
    assert not torch.allclose(kept, dropped)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"embedding_type": "sinusoidal"}, "embedding_type='sinusoidal'"),
        ({"encoder_type": "dense"}, "encoder_type='dense'"),
        ({"decoder_type": "residual"}, "decoder_type='residual'"),
        ({"img_resolution": 6, "channel_mult": [1, 2, 2]}, "img_resolution=6"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"model_channels": 2, "embedding_type": "fourier"}, "num_channels=2"),
    ],
)
def test_bad_songunet_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        SongUNet(**tiny_kwargs(**kwargs))


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="num_channels=144"):
        GroupNorm(144)


def test_bad_input_shape_raises():
    model = SongUNet(**tiny_kwargs())
    with pytest.raises(ValueError, match="x has shape"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_labels"):
        model(torch.randn(2, 3, 8, 8), torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# Shared dropout.


def dropout_denoiser() -> CMPrecond:
    torch.manual_seed(0)
    return randomize_(CMPrecond(SongUNet(**tiny_kwargs(dropout=0.5)))).train()


def test_shared_dropout_replays_masks():
    denoiser = dropout_denoiser()
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.1, 0.5, 2.0, 10.0])
    with shared_dropout(1234):
        student = denoiser(x, sigma)
        assert shared_dropout_active()
    with torch.no_grad(), shared_dropout(1234):
        teacher = denoiser(x, sigma)
    with shared_dropout(4321):
        other_seed = denoiser(x, sigma)
    assert not shared_dropout_active()
    assert torch.equal(student.detach(), teacher)
    assert not torch.allclose(student.detach(), other_seed.detach())
    student.square().mean().backward()  # masks from the private generator keep autograd intact
    with torch.no_grad():
        assert not torch.allclose(denoiser.eval()(x, sigma), teacher)  # eval disables dropout


def test_shared_dropout_leaves_global_rng_untouched():
    denoiser = dropout_denoiser()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 1.0])
    state = torch.get_rng_state()
    with torch.no_grad(), shared_dropout(7):
        denoiser(x, sigma)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        denoiser(x, sigma)  # outside a context dropout draws from the global RNG
    assert not torch.equal(torch.get_rng_state(), state)


def test_shared_dropout_nests_and_validates_seed():
    denoiser = dropout_denoiser()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 1.0])
    with torch.no_grad():
        with shared_dropout(1):
            first = denoiser(x, sigma)
            with shared_dropout(2):
                denoiser(x, sigma)
        with shared_dropout(1):
            again = denoiser(x, sigma)
    assert torch.equal(first, again)
    assert isinstance(draw_dropout_seed(torch.Generator().manual_seed(0)), int)
    with pytest.raises(ValueError, match="seed"):
        with shared_dropout(-1):
            pass


# ------------------------------------------------------------------------------------------------
# Mixed precision.


def test_amp_options_on_cpu():
    torch.manual_seed(0)
    model = randomize_(SongUNet(**tiny_kwargs()), seed=1)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        reference = EDMPrecond(model).eval()(x, sigma)
        fp16_on_cpu = EDMPrecond(model, amp_dtype=torch.float16).eval()(x, sigma)  # disabled on CPU
        bf16 = EDMPrecond(model, amp_dtype="bfloat16").eval()(x, sigma)
    assert torch.equal(fp16_on_cpu, reference)
    assert bf16.dtype == torch.float32
    assert (bf16 - reference).abs().max().item() < 0.1
    assert resolve_amp_dtype("bf16") is torch.bfloat16 and resolve_amp_dtype(None) is None
    with pytest.raises(ValueError, match="amp_dtype='int8'"):
        resolve_amp_dtype("int8")


# ------------------------------------------------------------------------------------------------
# Factory and Hydra configs.


def test_build_denoiser_validates_precond():
    denoiser = build_denoiser(tiny_kwargs(), precond="cm", precond_kwargs={"sigma_min": 0.002})
    assert isinstance(denoiser, CMPrecond) and denoiser.sigma_min == 0.002
    with pytest.raises(ValueError, match="precond='vp'"):
        build_denoiser(tiny_kwargs(), precond="vp")


def test_training_copy_keeps_init_kwargs():
    model = SongUNet(**tiny_kwargs(fourier_scale=0.02, embedding_type="fourier"))
    clone = SongUNet(**copy.deepcopy(model.init_kwargs))
    def layout(module):
        return [(name, tensor.shape) for name, tensor in module.state_dict().items()]

    assert layout(clone) == layout(model)


SMALL_CONFIGS = ["ddpmpp_tiny", "ncsnpp_tiny", "ddpmpp_digits", "ncsnpp_digits"]
CIFAR_CONFIGS = {"ddpmpp": 55_732_739, "ncsnpp": 56_395_523, "ncsnpp_ict": 56_395_523}


def compose_model(name: str, resolution: int, channels: int):
    from hydra import compose, initialize_config_dir

    overrides = [f"+model={name}", f"+dataset.resolution={resolution}", f"+dataset.channels={channels}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=None, overrides=overrides)


def test_every_model_config_is_covered():
    names = {path.stem for path in (CONFIG_DIR / "model").glob("*.yaml")}
    assert names == set(SMALL_CONFIGS) | set(CIFAR_CONFIGS)


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_configs_instantiate_and_train(name):
    from hydra.utils import instantiate

    cfg = compose_model(name, resolution=8, channels=1)
    torch.manual_seed(0)
    denoiser = instantiate(cfg.model).train()
    assert isinstance(denoiser, CMPrecond if cfg.model.precond == "cm" else EDMPrecond)
    assert denoiser.img_resolution == 8 and denoiser.img_channels == 1
    num_params = sum(parameter.numel() for parameter in denoiser.parameters())
    assert (num_params < 20_000) if "tiny" in name else (500_000 <= num_params <= 1_000_000)
    x = torch.randn(2, 1, 8, 8)
    with shared_dropout(0):
        out = denoiser(x, torch.tensor([0.01, 5.0]))
    out.square().mean().backward()
    assert all(parameter.grad is not None for parameter in denoiser.parameters())


@pytest.mark.parametrize("name", sorted(CIFAR_CONFIGS))
def test_cifar_configs_compose_at_paper_size(name):
    from hydra.utils import instantiate

    cfg = compose_model(name, resolution=32, channels=3)
    with torch.device("meta"):
        denoiser = instantiate(cfg.model)
    assert sum(parameter.numel() for parameter in denoiser.parameters()) == CIFAR_CONFIGS[name]
    if name == "ncsnpp_ict":
        assert isinstance(denoiser, CMPrecond) and denoiser.sigma_min == 0.002 and denoiser.c_noise_scale == 0.25
        assert cfg.model.network.dropout == 0.3 and cfg.model.network.fourier_scale == 0.02
    else:
        assert isinstance(denoiser, EDMPrecond) and cfg.model.network.dropout == 0.13
