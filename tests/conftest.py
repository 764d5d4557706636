"""Shared fixtures: small deterministic datasets and an isolated cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from tests.slurm_helpers import slurm_cluster, slurm_jobs  # noqa: F401  (fixtures for tests marked slurm)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session writes caches into its own temporary folder, never into ~/.cache."""
    os.environ["KNN_CM_CACHE"] = str(tmp_path_factory.mktemp("knn_cm_cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run fastest on one thread, and a shared 2-core CPU is not oversubscribed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def random_store() -> DataStore:
    """N = 2,000 random uint8 images of shape (3, 4, 4): d = 48 (the acceptance tests' dataset)."""
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(2000, 3, 4, 4), dtype=np.uint8)
    return DataStore.from_array(images, name="random")


@pytest.fixture(scope="session")
def clustered_store() -> DataStore:
    """N = 4,000 images (d = 48) in 40 tight clusters: a dataset where IVF partitions are meaningful."""
    return clustered_images_store(4000, (3, 4, 4), clusters=40, centre_range=(40, 215), spread=12, seed=1,
                                  name="clustered")


def clustered_images_store(count: int, shape: tuple[int, int, int], clusters: int, centre_range: tuple[float, float],
                           spread: float, seed: int, name: str) -> DataStore:
    """``count`` uint8 images of ``shape``: Gaussian blobs (std ``spread``) around ``clusters`` uniform centres."""
    generator = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    centres = generator.uniform(*centre_range, size=(clusters, dim))
    members = centres[generator.integers(0, clusters, size=count)] + generator.normal(0, spread, size=(count, dim))
    images = np.clip(np.rint(members), 0, 255).astype(np.uint8).reshape(count, *shape)
    return DataStore.from_array(images, name=name)


def shared_cifar_archive() -> Path:
    return SHARED / "data" / "cifar10-jpeg.tar.gz"
