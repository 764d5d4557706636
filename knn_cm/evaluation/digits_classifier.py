"""A small CNN digit classifier: the offline, CPU feature space for FID / IS on the embedded digits data.

Inception-v3 needs downloaded weights and is meaningless on 8x8 images, so for scikit-learn's digits
the project trains its own classifier once, deterministically, and caches it under
``cache_dir()/digits_classifier-<fingerprint of the digits store>-v1.pt``. Its penultimate layer
(128-d) is the feature space of FID and its 10 logits give the Inception Score.

Training: a fixed split (seeded permutation, 20% held out for the reported accuracy), fixed
initialisation and batch order (seeded generators), deterministic algorithms and one thread, so two
trainings from scratch give bit-identical weights on the same machine and software.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knn_cm.data import DataStore, load_digits, uint8_to_float
from knn_cm.io import atomic_path, cache_dir

CLASSIFIER_VERSION = 1
NUM_CLASSES = 10
FEATURE_DIM = 128
IMAGE_SHAPE = (1, 8, 8)
HELD_OUT_FRACTION = 0.2
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 2e-3


class DigitsClassifier(nn.Module):
    """Two 3x3 conv layers (32, 64 channels) + 2x2 max-pool + a 128-d ReLU layer + 10 logits.

    Input: float images [B, 1, 8, 8] in [-1, 1].
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.metadata: dict = {}

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images float [B, 1, 8, 8] in [-1, 1] -> (penultimate features [B, 128], logits [B, 10])."""
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 64, 4, 4]
        penultimate = F.relu(self.hidden(x.flatten(1)))
        return penultimate, self.head(penultimate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 1, 8, 8] in [-1, 1] -> logits [B, 10]."""
        return self.features(images)[1]


class DigitsFeatures(nn.Module):
    """The classifier as a feature extractor for torch-fidelity: uint8 images in, named features out.

    forward(images uint8 [B, 1, 8, 8]) -> {"penultimate": float32 [B, 128], "logits": float32 [B, 10]}.
    """

    FID_FEATURE = "penultimate"
    ISC_FEATURE = "logits"

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise ValueError(f"DigitsFeatures expects uint8 images, got dtype {images.dtype}")
        if tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"DigitsFeatures expects images [B, 1, 8, 8], got shape {tuple(images.shape)}")
        penultimate, logits = self.classifier.features(uint8_to_float(images))
        return {self.FID_FEATURE: penultimate, self.ISC_FEATURE: logits}


# ----------------------------------------------------------------------------------------------- data
def _digits_arrays(store: DataStore | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images [N, 1, 8, 8], int64 labels [N], fingerprint) of the digits store (no x-flip copies)."""
    store = load_digits() if store is None else store.with_xflip(False)
    if store.shape != IMAGE_SHAPE:
        raise ValueError(f"the digits classifier needs images of shape {IMAGE_SHAPE}, got {store.shape} "
                         f"(store {store.name!r})")
    if store.labels is None:
        raise ValueError(f"the digits classifier needs a labelled store, but store {store.name!r} has no labels")
    labels = np.asarray(store.labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"digit labels must lie in [0, {NUM_CLASSES}), got range [{labels.min()}, {labels.max()}]")
    return np.asarray(store.images), labels, store.fingerprint


def held_out_split(num_images: int, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train indices, held-out indices): a seeded permutation, the last 20% held out."""
    order = np.random.default_rng(seed).permutation(num_images)
    num_held_out = round(HELD_OUT_FRACTION * num_images)
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


# ------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def _deterministic_single_thread(seed: int):
    """Seed the global torch RNG (restored afterwards), force deterministic kernels and one thread."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
            torch.set_num_threads(previous_threads)


@torch.no_grad()
def classifier_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 images [N, 1, 8, 8] whose predicted class equals labels [N]."""
    was_training = classifier.training
    classifier.eval()
    predictions = classifier(uint8_to_float(images)).argmax(dim=1)
    classifier.train(was_training)
    return float((predictions == labels).to(torch.float64).mean())


def _fit(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int,
         batch_size: int, learning_rate: float) -> float:
    """Adam on cross-entropy over float images [N, 1, 8, 8] and labels [N]; returns the last epoch's loss."""
    optimiser = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    order_generator = torch.Generator().manual_seed(seed)
    classifier.train()
    epoch_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in torch.randperm(len(images), generator=order_generator).split(batch_size):
            loss = F.cross_entropy(classifier(images[batch]), labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        schedule.step()
        epoch_loss = total / count
    classifier.eval()
    return epoch_loss


def weights_digest(classifier: nn.Module) -> str:
    """blake2b of the parameters' bytes: identifies a trained classifier (caches of its features use it)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(classifier.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_digits_classifier(store: DataStore | None = None, seed: int = DEFAULT_SEED, epochs: int = DEFAULT_EPOCHS,
                            batch_size: int = DEFAULT_BATCH_SIZE,
                            learning_rate: float = DEFAULT_LEARNING_RATE) -> DigitsClassifier:
    """Train the classifier from scratch (no cache) on the fixed training split of the digits.

    Args:
        store: a labelled store of uint8 images [N, 1, 8, 8]; scikit-learn's digits when None.
        seed: seeds the split, the initialisation and the batch order.

    Returns:
        The trained classifier on CPU in eval mode; ``classifier.metadata`` holds the held-out
        accuracy, training time, sizes, seed and the weights digest.
    """
    images_np, labels_np, fingerprint = _digits_arrays(store)
    train_idx, held_out_idx = held_out_split(len(images_np), seed)
    images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np)
    started = time.perf_counter()
    with _deterministic_single_thread(seed):
        classifier = DigitsClassifier()
        final_loss = _fit(classifier, uint8_to_float(images[train_idx]), labels[train_idx], seed, epochs,
                          batch_size, learning_rate)
    classifier.requires_grad_(False)
    classifier.metadata = {
        "version": CLASSIFIER_VERSION,
        "store_fingerprint": fingerprint,
        "held_out_accuracy": classifier_accuracy(classifier, images[held_out_idx], labels[held_out_idx]),
        "train_accuracy": classifier_accuracy(classifier, images[train_idx], labels[train_idx]),
        "num_train": len(train_idx),
        "num_held_out": len(held_out_idx),
        "final_train_loss": final_loss,
        "train_seconds": time.perf_counter() - started,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "feature_dim": FEATURE_DIM,
        "torch_version": str(torch.__version__),
        "weights_digest": weights_digest(classifier),
    }
    return classifier


# ---------------------------------------------------------------------------------------------- cache
def _digits_fingerprint(store: DataStore | None) -> str:
    """Fingerprint of the stored digits images (x-flip copies excluded); scikit-learn's digits when None."""
    return (load_digits() if store is None else store.with_xflip(False)).fingerprint


def digits_classifier_path(store: DataStore | None = None) -> Path:
    """``cache_dir()/digits_classifier-<fingerprint>-v1.pt`` for the digits store (scikit-learn's when None)."""
    return _classifier_path(_digits_fingerprint(store))


def _classifier_path(fingerprint: str) -> Path:
    return cache_dir() / f"digits_classifier-{fingerprint}-v{CLASSIFIER_VERSION}.pt"


def _save(classifier: DigitsClassifier, path: Path) -> None:
    with atomic_path(path) as temp_path:
        torch.save({"state_dict": classifier.state_dict(), "metadata": classifier.metadata}, temp_path)


def _load(path: Path, fingerprint: str) -> DigitsClassifier | None:
    """The cached classifier, or None when the file is unreadable or was trained on other data."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        classifier = DigitsClassifier()
        classifier.load_state_dict(payload["state_dict"])
        metadata = dict(payload["metadata"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError):
        return None
    if metadata.get("store_fingerprint") != fingerprint or metadata.get("version") != CLASSIFIER_VERSION:
        return None
    classifier.metadata = metadata
    return classifier.eval().requires_grad_(False)


def load_digits_classifier(store: DataStore | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The cached digits classifier, trained (deterministically, in seconds on CPU) and cached when absent.

    Args:
        store: the labelled digits store it is trained on; scikit-learn's digits when None.
        device: where the returned model lives.

    Returns:
        DigitsClassifier in eval mode with ``.metadata`` (``held_out_accuracy``, ``train_seconds``, ...).
    """
    fingerprint = _digits_fingerprint(store)
    path = _classifier_path(fingerprint)
    classifier = _load(path, fingerprint) if path.exists() else None
    if classifier is None:
        classifier = train_digits_classifier(store)
        _save(classifier, path)
    return classifier.to(device)
