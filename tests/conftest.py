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
    generator = np.random.default_rng(1)
    centres = generator.uniform(40, 215, size=(40, 48))
    members = centres[generator.integers(0, 40, size=4000)] + generator.normal(0, 12, size=(4000, 48))
    images = np.clip(np.rint(members), 0, 255).astype(np.uint8).reshape(4000, 3, 4, 4)
    return DataStore.from_array(images, name="clustered")


def shared_cifar_archive() -> Path:
    return SHARED / "data" / "cifar10-jpeg.tar.gz"
