"""FID / IS through torch-fidelity on CPU, offline: the digits classifier as a registered feature extractor,
the reference-statistics cache, sample formats, and the Inception-weights error when offline."""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from knn_cm.data import DataStore, load_digits, uint8_to_float
from knn_cm.evaluation import feature_extractors
from knn_cm.evaluation.digits_classifier import (
    DigitsFeatures,
    digits_classifier_path,
    load_digits_classifier,
    train_digits_classifier,
)
from knn_cm.evaluation.feature_extractors import (
    INCEPTION_FILENAME,
    InceptionWeightsUnavailable,
    get_extractor_spec,
    register_extractor,
    torch_fidelity_inception_cache_path,
)
from knn_cm.evaluation.fidelity import (
    compute_fidelity,
    fidelity_cache_dir,
    reference_cache_name,
    reference_statistics_path,
)


@pytest.fixture(scope="module")
def digits() -> DataStore:
    return load_digits()


@pytest.fixture(scope="module")
def halves(digits):
    """(reference store: a random half of the digits, the other half as uint8 [899, 1, 8, 8])."""
    order = np.random.default_rng(0).permutation(len(digits))
    reference = DataStore.from_array(digits.images[order[:898]], name="digits-half")
    return reference, digits.uint8(order[898:])


def binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """uint8 [M, 1, H, W] -> float [M, 1, H, W] in [-1, 1] blurred with the 3x3 binomial kernel."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    return F.conv2d(F.pad(uint8_to_float(images), (1, 1, 1, 1), mode="replicate"), kernel[None, None])


@pytest.fixture(scope="module")
def digits_metrics(halves):
    """compute_fidelity(..., "digits") of real, blurred, uniform-noise and constant images vs the reference."""
    reference, real = halves
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = {"real": real, "blurred": binomial_blur(real), "noise": noise, "constant": torch.full_like(real, 128)}
    metrics = {name: compute_fidelity(images, reference, feature_extractor="digits") for name, images in inputs.items()}
    print({name: {k: round(v, 3) for k, v in m.items() if isinstance(v, float)} for name, m in metrics.items()})
    return metrics


def test_digits_classifier_trains_deterministically_and_accurately(one_torch_thread):
    cached = load_digits_classifier()  # trained from scratch into the session's temporary cache
    assert digits_classifier_path().is_file()
    fresh = train_digits_classifier()  # a second training from scratch
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    metadata = cached.metadata
    print({key: metadata[key] for key in ("held_out_accuracy", "num_held_out", "train_seconds")})
    assert metadata["held_out_accuracy"] >= 0.95
    assert metadata["weights_digest"] == fresh.metadata["weights_digest"]
    modified = digits_classifier_path().stat().st_mtime_ns
    assert load_digits_classifier().metadata["weights_digest"] == metadata["weights_digest"]
    assert digits_classifier_path().stat().st_mtime_ns == modified  # loaded, not retrained


def test_digits_fid_ranks_real_below_blurred_below_noise(digits_metrics):
    fid = {name: metrics["fid"] for name, metrics in digits_metrics.items()}
    assert fid["real"] < fid["blurred"] < fid["noise"]
    assert fid["real"] < 0.05 * fid["noise"]
    assert all(m["num_samples"] == 899 and m["num_reference"] == 898 for m in digits_metrics.values())


def test_digits_inception_score_real_high_constant_one(digits_metrics):
    assert digits_metrics["real"]["isc_mean"] > 7.0
    assert digits_metrics["constant"]["isc_mean"] == pytest.approx(1.0, abs=1e-6)
    assert digits_metrics["real"]["isc_mean"] > digits_metrics["noise"]["isc_mean"]


def test_float_numpy_and_uint8_samples_give_the_same_result(halves, digits_metrics):
    reference, real = halves
    assert compute_fidelity(uint8_to_float(real), reference, feature_extractor="digits") == digits_metrics["real"]
    assert compute_fidelity(real.numpy(), reference, feature_extractor="digits") == digits_metrics["real"]
    with pytest.raises(ValueError, match="must lie in"):
        compute_fidelity(real.float(), reference, feature_extractor="digits")  # 0..255 floats


class CountingDigitsFeatures(nn.Module):
    """DigitsFeatures that counts the images it processes (class-wide, across torch-fidelity's instances)."""

    images_seen = 0

    def __init__(self):
        super().__init__()
        self.inner = DigitsFeatures(load_digits_classifier())

    def forward(self, images):
        CountingDigitsFeatures.images_seen += len(images)
        return self.inner(images)


def _count_images(call) -> int:
    CountingDigitsFeatures.images_seen = 0
    call()
    return CountingDigitsFeatures.images_seen


def test_reference_statistics_are_cached_and_reused(digits):
    register_extractor("test-counting-digits", CountingDigitsFeatures, DigitsFeatures.FID_FEATURE,
                       DigitsFeatures.ISC_FEATURE, input_shape=(1, 8, 8), version="test", replace=True)
    reference = DataStore.from_array(digits.images[:300], name="digits-first-300")
    samples = digits.uint8(np.arange(300, 350))
    statistics = reference_statistics_path(reference, "test-counting-digits")
    assert not statistics.exists()

    def run(**options):
        return compute_fidelity(samples, reference, feature_extractor="test-counting-digits", **options)

    assert _count_images(run) == 50 + 300  # the samples once (for FID and IS), the reference once
    assert statistics.is_file() and statistics.parent == fidelity_cache_dir()
    assert not [p for p in os.listdir(fidelity_cache_dir()) if "-features-" in p]  # only statistics are kept
    first = run()
    assert _count_images(run) == 50  # the reference statistics come from the cache
    assert _count_images(lambda: run(cache=False)) == 50 + 300
    assert run() == first
    assert first["feature_extractor"] == "test-counting-digits"


def test_inception_error_names_both_options_for_a_missing_file(halves, tmp_path):
    reference, real = halves
    started = time.perf_counter()
    with pytest.raises(InceptionWeightsUnavailable) as error:
        compute_fidelity(real, reference, feature_extractor="inception", inception_weights=tmp_path / "absent.pth")
    message = str(error.value)
    assert "inception_weights=PATH" in message and "metrics.inception_weights" in message
    assert INCEPTION_FILENAME in message and "download it once" in message
    assert str(torch_fidelity_inception_cache_path()) in message
    assert time.perf_counter() - started < 5  # detected before any feature extraction


def test_inception_error_when_the_download_fails_offline(halves, tmp_path, monkeypatch):
    """No weights path, none in torch-fidelity's cache, and the download fails (no network; the URL is
    pointed at a closed local port so the test neither hangs nor downloads anywhere)."""
    reference, real = halves
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(feature_extractors, "INCEPTION_URL", f"http://127.0.0.1:9/{INCEPTION_FILENAME}")
    monkeypatch.setattr(feature_extractors, "DOWNLOAD_TIMEOUT_SECONDS", 5.0)
    with pytest.raises(InceptionWeightsUnavailable) as error:
        compute_fidelity(real, reference, feature_extractor="inception")
    message = str(error.value)
    assert "inception_weights=PATH" in message and "download" in message and "failed" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILENAME) in message
    assert not torch_fidelity_inception_cache_path().exists()


@pytest.mark.slow
def test_inception_plumbing_with_a_local_weights_file(digits, tmp_path, monkeypatch):
    """Grey digits repeated to RGB through torch-fidelity's Inception-v3, weights from inception_weights
    (randomly initialised here: the real file cannot be downloaded offline)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.save({}, tmp_path / "empty.pth")
    with monkeypatch.context() as patch:  # build a random network: skip loading the (empty) state dict
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        torch.manual_seed(0)
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(network.state_dict(), tmp_path / INCEPTION_FILENAME)
    digest = hashlib.sha256((tmp_path / INCEPTION_FILENAME).read_bytes()).hexdigest()
    monkeypatch.setattr(feature_extractors, "INCEPTION_SHA256_PREFIX", digest[:8])  # stands in for the real file
    reference = DataStore.from_array(digits.images[:3], name="digits-first-3")
    result = compute_fidelity(digits.uint8([3, 4, 5]), reference, feature_extractor="inception", isc_splits=3,
                              inception_weights=tmp_path / INCEPTION_FILENAME, cache=False)
    assert result["feature_extractor"] == "inception" and result["num_samples"] == 3
    assert all(math.isfinite(result[key]) for key in ("fid", "isc_mean", "isc_std"))


def test_bad_arguments_raise_value_errors(halves):
    reference, real = halves
    with pytest.raises(ValueError, match="allowed: .*digits.*inception"):
        compute_fidelity(real, reference, feature_extractor="vgg")
    with pytest.raises(ValueError, match="shape"):
        compute_fidelity(real[:, :, :4], reference, feature_extractor="digits")
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("digits", CountingDigitsFeatures, "penultimate")


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_payload_is_live(tmp_path):
    """The payload below runs code when unpickled fully, as torch-fidelity unpickles its caches and weights."""
    torch.save({"mu": CreatesMarker(tmp_path / "marker")}, tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("crafted", ["pickles", "truncated"])
def test_statistics_cache_runs_no_code_and_corrupt_files_are_recomputed(digits, tmp_path, crafted):
    """A statistics cache with pickled code (in torch-fidelity's .pt cache and in an .npz object array) is
    never unpickled; a corrupt .npz is recomputed with a warning naming it."""
    marker = tmp_path / "marker"
    reference = DataStore.from_array(digits.images[:200 + len(crafted)], name=f"digits-cache-{crafted}")
    samples = digits.uint8(np.arange(300, 360))
    expected = compute_fidelity(samples, reference, feature_extractor="digits", isc=False, cache=False)
    path = reference_statistics_path(reference, "digits")
    spec = get_extractor_spec("digits")
    torch_fidelity_cache = fidelity_cache_dir() / (f"{reference_cache_name(reference, spec)}-"
                                                  f"{spec.torch_fidelity_name}-stat-fid-{spec.fid_feature}.pt")
    torch_fidelity_cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mu": CreatesMarker(marker), "sigma": CreatesMarker(marker)}, torch_fidelity_cache)
    if crafted == "pickles":
        payload = np.empty(1, dtype=object)
        payload[0] = CreatesMarker(marker)
        with open(path, "wb") as handle:
            np.savez(handle, mu=payload, sigma=payload, num_images=np.int64(len(reference)),
                     fingerprint=np.str_(reference.fingerprint))
    else:
        compute_fidelity(samples, reference, feature_extractor="digits", isc=False)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.warns(RuntimeWarning, match=f"FID statistics cache {path} is not usable"):
        result = compute_fidelity(samples, reference, feature_extractor="digits", isc=False)
    assert result["fid"] == expected["fid"] and not marker.exists()
    with np.load(path, allow_pickle=False) as archive:  # rewritten as plain arrays
        assert archive["sigma"].shape == (128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_fidelity(samples, reference, feature_extractor="digits", isc=False) == expected


def test_crafted_inception_weights_run_no_code(halves, tmp_path, monkeypatch):
    """A weights file holding code: refused by the hash check, and (when the hash is made to match)
    by the weights-only load; no marker either way."""
    reference, real = halves
    marker = tmp_path / "marker"
    weights = tmp_path / INCEPTION_FILENAME
    torch.save({"Conv2d_1a_3x3.conv.weight": CreatesMarker(marker)}, weights)
    with pytest.raises(InceptionWeightsUnavailable, match="its SHA-256 is .* the published hash starts with 6726825d"):
        compute_fidelity(real, reference, feature_extractor="inception", inception_weights=weights)
    assert not marker.exists()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(feature_extractors, "INCEPTION_SHA256_PREFIX", digest[:8])
    with pytest.raises(InceptionWeightsUnavailable, match="could run code"):
        compute_fidelity(real, reference, feature_extractor="inception", inception_weights=weights)
    assert not marker.exists()
