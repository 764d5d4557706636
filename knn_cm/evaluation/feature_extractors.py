"""Feature extractors for FID / IS, registered with torch-fidelity.

Two are built in:

- ``"inception"``: torch-fidelity's Inception-v3 (``inception-v3-compat``, the standard FID / IS network),
  registered as ``knn-cm-inception-v3-compat`` so that its weights are read safely: from
  ``inception_weights`` (a local ``.pth``) or torch-fidelity's download into the torch hub cache, the
  file's SHA-256 is checked against the hash published in its name (torch.hub's convention:
  ``weights-inception-2015-12-05-6726825d.pth`` -> the digest starts with ``6726825d``) and it is
  unpickled with ``weights_only=True`` (torch-fidelity itself would unpickle it fully, running any code
  in it). :func:`resolve_inception_weights` checks all this before any long work and raises
  :class:`InceptionWeightsUnavailable` naming both ways to provide the weights.
- ``"digits"``: the project's small CNN digit classifier (:mod:`knn_cm.evaluation.digits_classifier`),
  offline and CPU-friendly: FID in its 128-d penultimate space, IS from its 10 logits.

:func:`register_extractor` registers any other ``nn.Module`` (uint8 images in, named features out) as a
torch-fidelity ``FeatureExtractorBase`` subclass, so FID / IS still go through
``torch_fidelity.calculate_metrics``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from knn_cm.evaluation.digits_classifier import DigitsFeatures, load_digits_classifier
from knn_cm.weights_only import UnreadableTorchFile, load_weights_only

INCEPTION = "inception"
DIGITS = "digits"
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
# The published hash: torch.hub names files "<name>-<first hex digits of their SHA-256>.<ext>" (hub.HASH_REGEX).
INCEPTION_SHA256_PREFIX = re.search(r"-([a-f0-9]+)\.", INCEPTION_FILENAME).group(1)  # "6726825d"
INCEPTION_TORCH_FIDELITY_NAME = "knn-cm-inception-v3-compat"
INCEPTION_WEIGHTS_CONFIG_KEY = "metrics.inception_weights"
DOWNLOAD_TIMEOUT_SECONDS = 30.0
TORCH_FIDELITY_PREFIX = "knn-cm-"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


# ------------------------------------------------------------------------------------------ the specs
@dataclass(frozen=True)
class ExtractorSpec:
    """How compute_fidelity drives one feature extractor through torch-fidelity.

    Attributes:
        name: the knn_cm name (``compute_fidelity(feature_extractor=name)``).
        torch_fidelity_name: the name it is registered under in torch-fidelity.
        fid_feature: the feature (layer) FID uses, e.g. "2048" or "penultimate".
        isc_feature: the logits IS uses, or None when the extractor has none.
        input_channels: 3 repeats grey images to RGB (Inception); None passes images as they are.
        input_shape: the (C, H, W) the extractor requires, or None for any size.
        version: a string, or a zero-argument callable returning one, identifying the extractor's
            weights; it is part of the reference-statistics cache name.
    """

    name: str
    torch_fidelity_name: str
    fid_feature: str
    isc_feature: str | None
    input_channels: int | None = None
    input_shape: tuple[int, int, int] | None = None
    version: str | Callable[[], str] = "1"

    def cache_token(self) -> str:
        """The extractor-identity part of cache names (filesystem-safe)."""
        version = self.version() if callable(self.version) else self.version
        return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(version))


_SPECS: dict[str, ExtractorSpec] = {}


def available_extractors() -> list[str]:
    """Names accepted by ``compute_fidelity(feature_extractor=...)``."""
    return sorted(_SPECS)


def get_extractor_spec(name: str) -> ExtractorSpec:
    """The spec registered under ``name``; ValueError listing the allowed names otherwise."""
    if name not in _SPECS:
        raise ValueError(f"unknown feature_extractor {name!r}; allowed: {', '.join(available_extractors())}")
    return _SPECS[name]


# ------------------------------------------------------------------------- torch-fidelity registration
def _torch_fidelity_class(spec: ExtractorSpec, module_factory: Callable[[], nn.Module]) -> type:
    """A FeatureExtractorBase subclass wrapping ``module_factory()`` for torch-fidelity's registry."""
    provided = tuple(dict.fromkeys(f for f in (spec.fid_feature, spec.isc_feature) if f is not None))
    defaults = {"fid": spec.fid_feature, "kid": spec.fid_feature, "prc": spec.fid_feature,
                "isc": spec.isc_feature if spec.isc_feature is not None else spec.fid_feature}
    dummy_shape = spec.input_shape or (spec.input_channels or 3, 8, 8)

    class RegisteredFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor: uint8 images [B, C, H, W] -> tuple of float32 [B, D] features."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.module = module_factory()
            self.requires_grad_(False)
            self.eval()

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.module(images)
            if not isinstance(features, Mapping):
                raise ValueError(f"feature extractor {spec.name!r} must return a dict of features, "
                                 f"got {type(features).__name__}")
            missing = [name for name in self.features_list if name not in features]
            if missing:
                raise ValueError(f"feature extractor {spec.name!r} returned features {sorted(features)}, "
                                 f"missing {missing}")
            return tuple(features[name].to(torch.float32) for name in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return provided

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return defaults[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros((1, *dummy_shape), dtype=torch.uint8)

    RegisteredFeatureExtractor.__name__ = RegisteredFeatureExtractor.__qualname__ = (
        f"FeatureExtractor_{re.sub(r'[^A-Za-z0-9_]', '_', spec.name)}")
    return RegisteredFeatureExtractor


def register_extractor(name: str, module_factory: Callable[[], nn.Module], fid_feature: str,
                       isc_feature: str | None = None, *, input_channels: int | None = None,
                       input_shape: tuple[int, int, int] | None = None, version: str | Callable[[], str] = "1",
                       replace: bool = False) -> ExtractorSpec:
    """Register a feature extractor with torch-fidelity (as ``knn-cm-<name>``) and with compute_fidelity.

    Args:
        name: the name ``compute_fidelity(feature_extractor=name)`` accepts (letters, digits, ``_.-``).
        module_factory: builds the module (called each time torch-fidelity creates the extractor).
            Its forward maps uint8 images [B, C, H, W] to a dict {feature name: float [B, D]} that
            contains ``fid_feature`` (and ``isc_feature`` when given).
        fid_feature: the key of the features FID uses.
        isc_feature: the key of the logits the Inception Score uses (None: no IS).
        input_channels: 3 repeats grey images to RGB before the module; None passes them unchanged.
        input_shape: the (C, H, W) the module needs (checked before extraction), None for any.
        version: identifies the module's weights (a string or a callable); change it when the weights
            change, since cached reference statistics are keyed by it.
        replace: overwrite an existing registration of ``name`` instead of raising.

    Returns:
        The registered :class:`ExtractorSpec`.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"extractor name must be non-empty letters, digits or '_.-', got {name!r}")
    if name in _SPECS and not replace:
        raise ValueError(f"feature extractor {name!r} is already registered (pass replace=True to overwrite)")
    if name == INCEPTION:
        raise ValueError(f"the name {INCEPTION!r} is reserved for torch-fidelity's Inception-v3")
    if not callable(module_factory):
        raise ValueError(f"module_factory must be callable, got {type(module_factory).__name__}")
    if input_channels not in (None, 3):
        raise ValueError(f"input_channels must be None (unchanged) or 3 (grey repeated to RGB), got {input_channels}")
    if not isinstance(fid_feature, str) or (isc_feature is not None and not isinstance(isc_feature, str)):
        raise ValueError(f"fid_feature and isc_feature must be feature names (str), got {fid_feature!r}, "
                         f"{isc_feature!r}")
    spec = ExtractorSpec(name, TORCH_FIDELITY_PREFIX + name, fid_feature, isc_feature, input_channels,
                         None if input_shape is None else tuple(int(s) for s in input_shape), version)
    _register_torch_fidelity(spec.torch_fidelity_name, _torch_fidelity_class(spec, module_factory), replace)
    _SPECS[name] = spec
    return spec


def _register_torch_fidelity(name: str, cls: type, replace: bool) -> None:
    if name in FEATURE_EXTRACTORS_REGISTRY:
        if not replace:
            raise ValueError(f"torch-fidelity already has a feature extractor {name!r}")
        FEATURE_EXTRACTORS_REGISTRY[name] = cls  # torch-fidelity's API cannot replace
    else:
        register_feature_extractor(name, cls)


# ------------------------------------------------------------------------------- Inception-v3 weights
class InceptionWeightsUnavailable(RuntimeError):
    """Neither a local Inception weights file nor torch-fidelity's download/cache is available."""


def torch_fidelity_inception_cache_path() -> Path:
    """Where torch-fidelity's download puts the Inception weights: ``<torch hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _weights_message(reason: str) -> str:
    return (f"Inception-v3 weights for FID / IS are unavailable: {reason}. Either pass inception_weights=PATH "
            f"({INCEPTION_WEIGHTS_CONFIG_KEY}=PATH) pointing at {INCEPTION_FILENAME} (from {INCEPTION_URL}), "
            f"or allow torch-fidelity to download it once (internet) into its cache "
            f"{torch_fidelity_inception_cache_path()}.")


def check_inception_hash(data: bytes, path: str | Path) -> None:
    """InceptionWeightsUnavailable unless the SHA-256 of ``data`` starts with the published hash."""
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise InceptionWeightsUnavailable(_weights_message(
            f"{path} is not {INCEPTION_FILENAME}: its SHA-256 is {digest[:16]}..., the published hash starts with "
            f"{INCEPTION_SHA256_PREFIX}"))


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception-v3 state dict in ``path``: hash-checked, then unpickled with ``weights_only=True``.

    The hash is computed from the same bytes that are loaded, so the file cannot change in between.
    """
    data = Path(path).read_bytes()
    check_inception_hash(data, path)
    try:
        state_dict = load_weights_only(data)
    except UnreadableTorchFile as error:
        raise InceptionWeightsUnavailable(_weights_message(f"{path} cannot be read: {error.reason}")) from None
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise InceptionWeightsUnavailable(_weights_message(f"{path} does not hold a state dict of tensors"))
    return dict(state_dict)


class WeightsOnlyInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 whose weights are hash-checked and read with ``weights_only=True``.

    torch-fidelity unpickles a weights file fully (``weights_only=False``); here the file is read by
    :func:`load_inception_state_dict` and torch-fidelity receives the checked tensors re-serialised in
    memory, so nothing from the file but tensors reaches its loader.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            feature_extractor_weights_path = resolve_inception_weights(None, verify=False)
        state_dict = load_inception_state_dict(feature_extractor_weights_path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Temporarily give new sockets a timeout, so a stalled download fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def resolve_inception_weights(inception_weights: str | Path | None = None, download: bool = True,
                              verbose: bool = False, verify: bool = True) -> Path:
    """The local path of torch-fidelity's Inception-v3 weights, downloading them into its cache if needed.

    Args:
        inception_weights: a local weights file; when None, torch-fidelity's cache
            (:func:`torch_fidelity_inception_cache_path`) is used, downloading into it once when absent
            (torch.hub checks the download against the published hash).
        download: allow that download (with a socket timeout of ``DOWNLOAD_TIMEOUT_SECONDS``).
        verify: check the file's SHA-256 against the published hash (the extractor checks it again
            when it loads the file).

    Raises:
        InceptionWeightsUnavailable: the file does not exist or has another hash, or the download is
            impossible (offline); the message names both ways to provide the weights.
    """
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsUnavailable(_weights_message(f"inception_weights={str(inception_weights)!r} "
                                                               f"is not a file"))
    else:
        path = torch_fidelity_inception_cache_path()
        if not path.is_file():
            if not download:
                raise InceptionWeightsUnavailable(_weights_message(f"no inception_weights given and {path} is absent"))
            _download(path, verbose)
    if verify:
        check_inception_hash(path.read_bytes(), path)
    return path


def _download(cached: Path, verbose: bool) -> None:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_SECONDS):
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_SHA256_PREFIX,
                                           progress=verbose)
    except (OSError, http.client.HTTPException, RuntimeError) as error:  # offline, timeouts, a wrong hash
        raise InceptionWeightsUnavailable(_weights_message(
            f"no inception_weights given, {cached} is absent and downloading it failed ({error})")) from error


# --------------------------------------------------------------------------------------- built-ins
def _register_builtins() -> None:
    """Inception-v3 (torch-fidelity's network, weights read safely) and the digits classifier."""
    _register_torch_fidelity(INCEPTION_TORCH_FIDELITY_NAME, WeightsOnlyInceptionV3, replace=True)
    _SPECS[INCEPTION] = ExtractorSpec(INCEPTION, INCEPTION_TORCH_FIDELITY_NAME, fid_feature="2048",
                                      isc_feature="logits_unbiased", input_channels=3, input_shape=None,
                                      version=INCEPTION_FILENAME.removesuffix(".pth"))
    register_extractor(DIGITS, lambda: DigitsFeatures(load_digits_classifier()),
                       fid_feature=DigitsFeatures.FID_FEATURE, isc_feature=DigitsFeatures.ISC_FEATURE,
                       input_shape=(1, 8, 8),
                       version=lambda: "classifier-" + load_digits_classifier().metadata["weights_digest"][:16],
                       replace=True)


_register_builtins()
