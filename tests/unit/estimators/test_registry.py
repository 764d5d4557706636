"""Estimators register themselves by name; a taken name or a class that is no estimator is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_cm.data import DataStore
from knn_cm.estimators import KNN, Estimator, estimator_class, make_estimator, register_estimator, registry


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_a_registered_class_is_built_by_its_name(clean_registry):
    @register_estimator("halved")
    class Halved(Estimator):
        needs_store = False
        uses_rows = False

        def posterior_mean(self, z, sigma, x, generator):
            return z / 2

    assert Halved.name == "halved" and estimator_class("halved") is Halved
    store = DataStore.from_array(np.zeros((4, 1, 2, 2), dtype=np.uint8))
    assert torch.equal(make_estimator("halved", store)(torch.ones(1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 0.5))


def test_a_taken_name_and_a_class_that_is_no_estimator_are_refused(clean_registry):
    with pytest.raises(ValueError, match=r"estimator name 'knn' is taken by knn_cm.estimators.knn.KNN"):
        register_estimator("knn")(type("Other", (Estimator,), {}))
    assert register_estimator("knn")(KNN) is KNN  # registering the same class again is no change
    with pytest.raises(TypeError, match="decorates Estimator subclasses"):
        register_estimator("plain")(object)
    with pytest.raises(ValueError, match="must be an identifier"):
        register_estimator("two words")


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown estimator 'nope'; allowed: .*knn"):
        estimator_class("nope")
