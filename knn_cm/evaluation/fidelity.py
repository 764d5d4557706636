"""FID and Inception Score of samples against the training set, through torch-fidelity's feature extractors.

``compute_fidelity(samples, reference)`` wraps both image sets as torch Datasets of uint8 [C, H, W],
extracts features with a registered feature extractor (see :mod:`knn_cm.evaluation.feature_extractors`):
torch-fidelity's Inception-v3 (``"inception"``), the project's digits classifier (``"digits"``) or any
extractor added with ``register_extractor``, and computes FID and IS with torch-fidelity's own formulas
(``fid_features_to_statistics`` / ``fid_statistics_to_metric``, ``isc_features_to_metric``). The samples
pass through the extractor once for both metrics.

The reference statistics (FID's mean and covariance of the training set's features) are cached under
``cache_dir()/fidelity`` as ``.npz`` files of plain arrays (:mod:`knn_cm.evaluation.statistics_cache`,
read with ``allow_pickle=False``), named by the store's name and content fingerprint, the extractor and
its weights version and the feature layer; torch-fidelity's own cache (``torch.save`` pickles read back
with full unpickling) is never used.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from knn_cm.data import DataStore, float_to_uint8
from knn_cm.device import as_device
from knn_cm.evaluation.feature_extractors import (
    INCEPTION,
    ExtractorSpec,
    InceptionWeightsUnavailable,
    get_extractor_spec,
    resolve_inception_weights,
)
from knn_cm.evaluation.statistics_cache import load_statistics, save_statistics
from knn_cm.io import cache_dir

__all__ = ["InceptionWeightsUnavailable", "compute_fidelity", "fidelity_cache_dir", "reference_cache_name",
           "reference_statistics_path", "to_uint8_images"]

ISC_SPLITS = 10
RNG_SEED = 2020  # torch-fidelity's default: fixes the IS split shuffling
FLOAT_RANGE_LIMIT = 2.0  # float samples beyond [-2, 2] are not [-1, 1] images (e.g. [0, 255] floats)


# ------------------------------------------------------------------------------------------- inputs
class _ImagesDataset(Dataset):
    """Items uint8 [C', H, W] for torch-fidelity from a row reader ``read(indices) -> uint8 [m, C, H, W]``.

    With ``repeat_to_rgb`` grey images (C = 1) are repeated to 3 channels (C' = 3).
    """

    def __init__(self, read, length: int, repeat_to_rgb: bool):
        self.read = read
        self.length = int(length)
        self.repeat_to_rgb = bool(repeat_to_rgb)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.read(np.array([index]))[0]
        if self.repeat_to_rgb and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image.contiguous()


def to_uint8_images(samples) -> torch.Tensor:
    """Samples as a CPU uint8 tensor [M, C, H, W].

    Args:
        samples: uint8 [M, C, H, W] (torch or numpy), or floats in [-1, 1] (rounded to uint8 with
            ``float_to_uint8``; values slightly outside are clamped).
    """
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"samples must be a torch tensor or numpy array, got {type(samples).__name__}")
    samples = samples.detach().cpu()
    if samples.ndim != 4:
        raise ValueError(f"samples must have shape [M, C, H, W], got shape {tuple(samples.shape)}")
    if samples.dtype == torch.uint8:
        return samples.contiguous()
    if not samples.is_floating_point():
        raise ValueError(f"samples must be uint8 or floats in [-1, 1], got dtype {samples.dtype}")
    low, high = (float(samples.min()), float(samples.max())) if samples.numel() else (0.0, 0.0)
    if low < -FLOAT_RANGE_LIMIT or high > FLOAT_RANGE_LIMIT or not np.isfinite([low, high]).all():
        raise ValueError(f"float samples must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}] "
                         f"(pass uint8 images for pixel values in 0..255)")
    return float_to_uint8(samples.to(torch.promote_types(samples.dtype, torch.float32))).contiguous()


def _check_inputs(images: torch.Tensor, reference: DataStore, spec: ExtractorSpec, fid: bool, isc: bool,
                  isc_splits: int) -> None:
    """ValueErrors for shapes or sizes the metrics or the extractor cannot handle."""
    shape = tuple(int(s) for s in images.shape[1:])
    if fid and shape != reference.shape:
        raise ValueError(f"samples have shape {shape} per image but the reference {reference.name!r} has "
                         f"{reference.shape}")
    if spec.input_shape is not None and shape != spec.input_shape:
        raise ValueError(f"feature_extractor {spec.name!r} needs images of shape {spec.input_shape}, got {shape}")
    if spec.input_channels == 3 and shape[0] not in (1, 3):
        raise ValueError(f"feature_extractor {spec.name!r} needs grey (C = 1) or RGB (C = 3) images, "
                         f"got C = {shape[0]}")
    if fid and (len(images) < 2 or len(reference) < 2):
        raise ValueError(f"FID needs at least 2 samples and 2 reference images, got {len(images)} and "
                         f"{len(reference)}")
    if isc and spec.isc_feature is None:
        raise ValueError(f"feature_extractor {spec.name!r} has no logits for the Inception Score; pass isc=False")
    if isc and int(isc_splits) < 1:
        raise ValueError(f"isc_splits must be positive, got {isc_splits}")
    if isc and len(images) < isc_splits:
        raise ValueError(f"the Inception Score needs at least isc_splits={isc_splits} samples, got {len(images)}")


def _cuda_flag(device) -> bool:
    """True for a CUDA device (torch-fidelity's ``cuda`` switch), False for CPU; ValueError otherwise."""
    return as_device(device, "device").type == "cuda"


# ---------------------------------------------------------------------------------------- the cache
def fidelity_cache_dir() -> Path:
    """``cache_dir()/fidelity``: where reference statistics are cached."""
    return cache_dir() / "fidelity"


def reference_cache_name(reference: DataStore, spec: ExtractorSpec) -> str:
    """The cache name of ``reference`` for an extractor: store name, fingerprint, extractor version."""
    store_name = re.sub(r"[^A-Za-z0-9_.]+", "_", reference.name) or "store"
    return f"knn-cm-{store_name}-{reference.fingerprint}-{spec.cache_token()}"


def reference_statistics_path(reference: DataStore, feature_extractor: str = INCEPTION) -> Path:
    """The ``.npz`` file holding the cached FID statistics (mu [D], sigma [D, D]) of ``reference``."""
    spec = get_extractor_spec(feature_extractor)
    return fidelity_cache_dir() / f"{reference_cache_name(reference, spec)}-{spec.name}-stat-fid-{spec.fid_feature}.npz"


# -------------------------------------------------------------------------------------------- metrics
def _extractor_kwargs(spec: ExtractorSpec, inception_weights, verbose: bool) -> dict:
    """Extra extractor arguments: the Inception weights path, resolved up front (the extractor checks its hash)."""
    if spec.name != INCEPTION:
        return {}
    path = resolve_inception_weights(inception_weights, verbose=verbose, verify=False)
    return {"feature_extractor_weights_path": str(path)}


def _features(extractor, data: Dataset, batch_size: int, cuda: bool, verbose: bool) -> dict[str, torch.Tensor]:
    """{feature name: float [M, D]} of every item of ``data`` (no DataLoader worker processes)."""
    return get_featuresdict_from_dataset(data, extractor, batch_size, cuda, True, verbose)


def _reference_statistics(extractor, reference: DataStore, reference_data: Dataset, spec: ExtractorSpec,
                          cache: bool, batch_size: int, cuda: bool, verbose: bool) -> dict:
    """FID statistics {"mu", "sigma"} of the reference, from the cache when it holds them."""
    path = reference_statistics_path(reference, spec.name)
    if cache:
        statistics = load_statistics(path, reference.fingerprint, len(reference))
        if statistics is not None:
            return statistics
    features = _features(extractor, reference_data, batch_size, cuda, verbose)[spec.fid_feature]
    statistics = fid_features_to_statistics(features)
    if cache:
        save_statistics(path, statistics, reference.fingerprint, len(reference))
    return statistics


def compute_fidelity(samples, reference: DataStore, feature_extractor: str = INCEPTION, fid: bool = True,
                     isc: bool = True, batch_size: int = 256, device: str | torch.device = "cpu",
                     inception_weights: str | Path | None = None, cache: bool = True, verbose: bool = False,
                     isc_splits: int = ISC_SPLITS) -> dict:
    """FID of ``samples`` against ``reference`` and their Inception Score, computed by torch-fidelity.

    Args:
        samples: uint8 [M, C, H, W] (torch or numpy) or floats in [-1, 1] (rounded to uint8).
        reference: the training set; FID compares against every element of it (including x-flipped
            copies when the store has ``xflip=True``). Its statistics are cached (``cache=True``).
        feature_extractor: "inception" (torch-fidelity's Inception-v3; grey images repeated to RGB),
            "digits" (the project's digits classifier) or a name given to ``register_extractor``.
        batch_size: images per feature-extractor batch.
        device: "cpu" or a CUDA device.
        inception_weights: local path of torch-fidelity's Inception weights file
            (weights-inception-2015-12-05-6726825d.pth); None uses torch-fidelity's download/cache.
            Checked before any feature extraction (InceptionWeightsUnavailable when unavailable or when
            its SHA-256 is not the published one); read with ``weights_only=True``.
        cache: read/write the reference statistics under ``cache_dir()/fidelity``.
        isc_splits: splits of the samples for IS mean and std (torch-fidelity's default 10).

    Returns:
        {"fid": float | None, "isc_mean": float | None, "isc_std": float | None, "num_samples": M,
         "num_reference": N, "feature_extractor": name}; None for metrics not requested.
    """
    spec = get_extractor_spec(feature_extractor)
    if not (fid or isc):
        raise ValueError("nothing to compute: fid and isc are both False")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = to_uint8_images(samples)
    _check_inputs(images, reference, spec, fid, isc, isc_splits)
    cuda = _cuda_flag(device)
    verbose = bool(verbose)
    requested = [spec.fid_feature] * bool(fid) + [spec.isc_feature] * bool(isc)
    repeat_to_rgb = spec.input_channels == 3
    sample_data = _ImagesDataset(lambda indices: images[torch.from_numpy(indices)], len(images), repeat_to_rgb)
    reference_data = _ImagesDataset(reference.uint8, len(reference), repeat_to_rgb)
    result = {"fid": None, "isc_mean": None, "isc_std": None, "num_samples": len(images),
              "num_reference": len(reference), "feature_extractor": spec.name}
    with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
        extractor = create_feature_extractor(spec.torch_fidelity_name, list(dict.fromkeys(requested)), cuda=cuda,
                                             verbose=verbose, **_extractor_kwargs(spec, inception_weights, verbose))
        features = _features(extractor, sample_data, int(batch_size), cuda, verbose)
        if fid:
            reference_statistics = _reference_statistics(extractor, reference, reference_data, spec, cache,
                                                         int(batch_size), cuda, verbose)
            sample_statistics = fid_features_to_statistics(features[spec.fid_feature])
            result["fid"] = float(fid_statistics_to_metric(sample_statistics, reference_statistics,
                                                           verbose)[KEY_METRIC_FID])
        if isc:
            scores = isc_features_to_metric(features[spec.isc_feature], splits=int(isc_splits), shuffle=True,
                                            rng_seed=RNG_SEED)
            result["isc_mean"] = float(scores[KEY_METRIC_ISC_MEAN])
            result["isc_std"] = float(scores[KEY_METRIC_ISC_STD])
    return result
