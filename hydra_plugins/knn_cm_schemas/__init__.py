"""knn-cm's structured config schemas, registered in Hydra's ConfigStore.

Hydra imports every module under ``hydra_plugins`` when it looks for plugins, which it does before composing
any config (``@hydra.main`` and ``compose`` alike), so the schemas are always registered. Each
``configs/train/trainer/*.yaml`` lists ``schema`` first in its defaults: OmegaConf then checks the type of every loop
setting as the config is composed (``trainer.max_steps=abc`` is refused naming the key, before anything runs).
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from knn_cm.training.config import TrainerConfig


@dataclass
class TrainerSchema(TrainerConfig):
    """The ``trainer`` node: the loop's settings (typed), plus the objective, optimizer and EMA, which are
    configured by their own groups (``objective@trainer.objective`` ...) and checked by their classes."""

    objective: Any = None
    optimizer: Any = None
    ema: Any = None


ConfigStore.instance().store(group="trainer", name="schema", node=TrainerSchema)
