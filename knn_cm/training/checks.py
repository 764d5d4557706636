"""The training settings, checked before a run folder is bound (train.py) and before a sweep starts its first job.

:func:`check_settings` runs every check that needs neither the data nor a device, so the stable sweeper runs it on
each job of a sweep (``hydra.sweeper.check`` in configs/train/train.yaml) before any job starts, on a login node too:

- the loop's settings (:class:`~knn_cm.training.config.TrainerConfig`),
- the index's settings (:class:`~knn_cm.search.IndexSpec`; against the dataset's size in the job itself),
- the estimator's arguments: it is built over a two-image stand-in with a flat index, so its own checks run
  (``estimator.k must be an integer >= 1, got -5``) without reading the data,
- the objective (with that estimator), the optimizer (its numeric settings by key, then built on one parameter),
  the EMA (on a one-weight module) and the model (on the meta device, no memory).

Errors name the full key (``estimator.k``, ``index.nlist``, ``trainer.optimizer.lr``). train.py then fits the settings
that the dataset's size bounds (:func:`fit_to_dataset`) and builds the real estimator on the real data, still before
the folder is bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from knn_cm.data import DataStore
from knn_cm.estimators import build_estimator
from knn_cm.search import IndexSpec
from knn_cm.settings import non_negative_number, unit_interval_number
from knn_cm.training.config import TrainerConfig, trainer_config
from knn_cm.training.ema import EMA

INDEX_SPEC_FIELDS = {field.name for field in dataclasses.fields(IndexSpec)}
FITTED_KEYS = ("estimator.k", "index.nprobe", "index.train_size")  # what fit_to_dataset may change


def estimator_spec(config: DictConfig) -> dict:
    """The estimator group with the index group as its ``index`` (knn_cm.estimators.factory's schema)."""
    return {**OmegaConf.to_container(config.estimator, resolve=True),
            "index": OmegaConf.to_container(config.index, resolve=True)}


def check_settings(config: DictConfig) -> TrainerConfig:
    """Check a composed training config without data or device (the module docstring); returns the loop's settings.

    The global random stream is left as it was (train.py seeds it before building the network).
    """
    resolved = OmegaConf.to_container(config, resolve=True)
    settings = trainer_config(resolved["trainer"])
    with torch.random.fork_rng(devices=[]):
        spec = estimator_spec(config)
        if spec.get("name") == "knn":
            check_index_spec(spec["index"], "index")
        estimator = build_estimator({**spec, "index": {"kind": "flat"}}, _stand_in_store(), "cpu",
                                    index_setting="index")
        with _named("trainer.objective"):
            instantiate(config.trainer.objective)(estimator=estimator)
        check_optimizer(resolved["trainer"]["optimizer"], "trainer.optimizer")
        with _named("trainer.optimizer"):
            instantiate(config.trainer.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        with _named("trainer.ema"):
            EMA(torch.nn.Linear(1, 1), **resolved["trainer"]["ema"])
        with _named("model"), torch.device("meta"):
            instantiate(config.model)
    return settings


def check_index_spec(index: Mapping, setting: str = "index") -> None:
    """The index's own settings (kind, nlist, nprobe, precision, projection), named ``<setting>.<key>``."""
    fields = {key: value for key, value in index.items() if key in INDEX_SPEC_FIELDS}
    with _named(setting, fields):
        IndexSpec(**fields)


def check_optimizer(optimizer: Mapping, setting: str = "trainer.optimizer") -> None:
    """The optimizer's numeric settings in the terms of their keys (torch's own errors name no key and no range):
    ``lr``, ``eps``, ``weight_decay``, ``momentum`` >= 0, each of ``betas`` in [0, 1)."""
    for key in ("lr", "eps", "weight_decay", "momentum"):
        if key in optimizer:
            non_negative_number(optimizer[key], f"{setting}.{key}")
    betas = optimizer.get("betas")
    if betas is not None:
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise ValueError(f"{setting}.betas must be two numbers in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            unit_interval_number(beta, f"{setting}.betas[{i}]")


def fit_to_dataset(config: DictConfig, size: int) -> list[str]:
    """Settings bounded by the dataset's size N, set to what runs on it (so config.yaml records what ran), with one
    line per change for the log: a KNN estimator's ``estimator.k`` > N searches all N elements and becomes N; an
    index's ``index.nprobe`` beyond its nlist lists and ``index.train_size`` beyond N become those bounds. ``n``
    (draws, with replacement) and ``nlist`` (refused beyond N by the index) are left as they are."""
    changes = []
    if config.estimator.get("name") != "knn":
        return changes
    k = config.estimator.get("k")
    if isinstance(k, int) and not isinstance(k, bool) and k > size:
        changes.append(f"estimator.k={k} exceeds the dataset size N={size}: the estimator searches all {size} "
                       f"elements (k = N, the exact posterior), and estimator.k={size} is recorded")
        config.estimator.k = size
    index = OmegaConf.to_container(config.index, resolve=True)
    fields = {key: value for key, value in index.items() if key in INDEX_SPEC_FIELDS}
    if fields.get("kind", "flat") not in ("ivf", "ivf_sq8", "sq8"):
        return changes
    try:
        resolved = IndexSpec(**fields).resolved(size)
    except ValueError:
        return changes  # the index refuses it itself, naming the setting (index.nlist=... exceeds N)
    bounds = {"nprobe": f"the index's nlist={resolved.nlist} lists", "train_size": f"the dataset size N={size}"}
    for name, bound in bounds.items():
        given, ran = fields.get(name), getattr(resolved, name)
        if given is not None and ran != given:
            changes.append(f"index.{name}={given} exceeds {bound}: index.{name}={ran} runs and is recorded")
            config.index[name] = ran
    return changes


def _stand_in_store() -> DataStore:
    """Two blank 1x2x2 images: enough for an estimator to check its arguments, nothing read from disk."""
    return DataStore.from_array(np.zeros((2, 1, 2, 2), dtype=np.uint8), name="stand-in")


@contextmanager
def _named(setting: str, keys: Mapping | None = None) -> Iterator[None]:
    """Re-raise a ValueError / TypeError with its setting in front (``trainer.optimizer: Invalid learning rate``);
    one that starts with a key of ``keys`` gets the full key (``index.nlist must be ...``)."""
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if message.startswith(setting) or type(error) not in (ValueError, TypeError):
            raise
        key = next((key for key in keys or () if message.startswith(key)), None)
        raise ValueError(f"{setting}.{message}" if key else f"{setting}: {message}") from error
