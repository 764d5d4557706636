"""The dataset, index and estimator config groups build the library objects they describe (the estimator and index
groups through knn_cm.estimators.factory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from knn_cm.estimators import build_estimator
from knn_cm.search import build_index

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_digits_dataset_config_builds_the_store():
    config = OmegaConf.load(CONFIGS / "common" / "dataset" / "digits.yaml")
    store = instantiate(config.store)
    assert len(store) == 1797 and store.shape == (config.channels, config.resolution, config.resolution)


def test_array_dataset_config(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((5, 2, 4, 4), np.uint8))
    config = OmegaConf.load(CONFIGS / "common" / "dataset" / "array.yaml")
    config.path, config.resolution, config.channels = str(tmp_path / "images.npy"), 4, 2
    assert instantiate(config.store).shape == (2, 4, 4)


@pytest.mark.parametrize("kind", ["flat", "ivf", "sq8", "ivf_sq8"])
def test_index_configs(clustered_store, kind):
    config = OmegaConf.load(CONFIGS / "train" / "index" / f"{kind}.yaml")
    if kind.startswith("ivf"):
        config.nlist, config.nprobe = 20, 4
    index = build_index(clustered_store, **OmegaConf.to_container(config))
    assert index.kind == kind and index.size == len(clustered_store)


@pytest.mark.parametrize("name", ["single", "exact", "mc", "uniform", "stf", "knn"])
def test_estimator_configs(random_store, name):
    spec = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train" / "estimator" / f"{name}.yaml"))
    flat = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train" / "index" / "flat.yaml"))
    estimator = build_estimator({**spec, "index": flat}, random_store)
    assert estimator.name == name and (name != "knn" or estimator.index.kind == "flat")
    x = random_store.float([0, 1])
    out = estimator(x + 0.5 * torch.randn_like(x), 0.5, x=x)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
