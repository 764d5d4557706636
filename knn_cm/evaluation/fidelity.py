"""FID and Inception Score of samples against the training set, through torch-fidelity.

``compute_fidelity(samples, reference)`` wraps both image sets as torch Datasets of uint8 [C, H, W]
and calls ``torch_fidelity.calculate_metrics`` with a registered feature extractor (see
:mod:`knn_cm.evaluation.feature_extractors`): torch-fidelity's Inception-v3 (``"inception"``), the
project's digits classifier (``"digits"``) or any extractor added with ``register_extractor``.

The reference statistics (FID's mean and covariance of the training set's features) are cached by
torch-fidelity's own cache under ``cache_dir()/fidelity``, named by the store's name and content
fingerprint, the extractor and its weights version, so later calls against the same training set
only extract features of the samples. torch-fidelity also caches the reference's raw features on the
way; those are deleted (the statistics suffice, and the raw features of a large training set take
gigabytes). FID and IS are two calculate_metrics calls (FID-only, then IS-only), so the samples pass
through the extractor once per requested metric: torch-fidelity's combined FID + IS path would extract
and cache the reference's raw features (both layers) on every cache-less run instead.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity import KEY_METRIC_FID, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, calculate_metrics

from knn_cm.data import DataStore, float_to_uint8
from knn_cm.device import as_device
from knn_cm.evaluation.feature_extractors import (INCEPTION, ExtractorSpec, InceptionWeightsUnavailable,
                                                  get_extractor_spec, resolve_inception_weights)
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
    """``cache_dir()/fidelity``: torch-fidelity's ``cache_root`` for reference statistics."""
    return cache_dir() / "fidelity"


def reference_cache_name(reference: DataStore, spec: ExtractorSpec) -> str:
    """torch-fidelity's ``input2_cache_name`` for ``reference``: store name, fingerprint, extractor version."""
    store_name = re.sub(r"[^A-Za-z0-9_.]+", "_", reference.name) or "store"
    return f"knn-cm-{store_name}-{reference.fingerprint}-{spec.cache_token()}"


def _cache_file(cache_name: str, spec: ExtractorSpec, kind: str) -> Path:
    """torch-fidelity's file name for a cached item of kind "stat-fid" or "features"."""
    return fidelity_cache_dir() / f"{cache_name}-{spec.torch_fidelity_name}-{kind}-{spec.fid_feature}.pt"


def reference_statistics_path(reference: DataStore, feature_extractor: str = INCEPTION) -> Path:
    """The file holding the cached FID statistics (mu [D], sigma [D, D]) of ``reference``."""
    spec = get_extractor_spec(feature_extractor)
    return _cache_file(reference_cache_name(reference, spec), spec, "stat-fid")


# -------------------------------------------------------------------------------------------- metrics
def _extractor_kwargs(spec: ExtractorSpec, inception_weights, verbose: bool) -> dict:
    """Extra calculate_metrics arguments of the extractor: the Inception weights path, resolved up front."""
    if spec.name != INCEPTION:
        return {}
    return {"feature_extractor_weights_path": str(resolve_inception_weights(inception_weights, verbose=verbose))}


def _fid(samples: Dataset, reference: DataStore, reference_data: Dataset, spec: ExtractorSpec, cache: bool,
         common: dict) -> float:
    """FID through torch-fidelity's FID-only path, which reads/writes only the reference statistics."""
    cache_name = reference_cache_name(reference, spec)
    metrics = calculate_metrics(input1=samples, input2=reference_data, fid=True, isc=False,
                                feature_layer_fid=spec.fid_feature, cache=cache, cache_root=str(fidelity_cache_dir()),
                                input2_cache_name=cache_name if cache else None, **common)
    if cache:  # keep the statistics, drop the raw reference features torch-fidelity cached on the way
        _cache_file(cache_name, spec, "features").unlink(missing_ok=True)
    return float(metrics[KEY_METRIC_FID])


def _isc(samples: Dataset, spec: ExtractorSpec, isc_splits: int, common: dict) -> tuple[float, float]:
    """(IS mean, IS std over ``isc_splits`` splits) of the samples through torch-fidelity."""
    metrics = calculate_metrics(input1=samples, isc=True, fid=False, feature_layer_isc=spec.isc_feature,
                                isc_splits=isc_splits, samples_shuffle=True, rng_seed=RNG_SEED, cache=False,
                                **common)
    return float(metrics[KEY_METRIC_ISC_MEAN]), float(metrics[KEY_METRIC_ISC_STD])


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
            Checked before any feature extraction (InceptionWeightsUnavailable when unavailable).
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
    common = {"feature_extractor": spec.torch_fidelity_name, "batch_size": int(batch_size), "cuda": cuda,
              "verbose": bool(verbose), "save_cpu_ram": True,  # no DataLoader worker processes
              **_extractor_kwargs(spec, inception_weights, verbose)}
    repeat_to_rgb = spec.input_channels == 3
    sample_data = _ImagesDataset(lambda indices: images[torch.from_numpy(indices)], len(images), repeat_to_rgb)
    reference_data = _ImagesDataset(reference.uint8, len(reference), repeat_to_rgb)
    result = {"fid": None, "isc_mean": None, "isc_std": None, "num_samples": len(images),
              "num_reference": len(reference), "feature_extractor": spec.name}
    with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
        if fid:
            result["fid"] = _fid(sample_data, reference, reference_data, spec, cache, common)
        if isc:
            result["isc_mean"], result["isc_std"] = _isc(sample_data, spec, isc_splits, common)
    return result
