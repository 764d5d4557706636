"""A sweeper whose run folders are named by the swept values only, so a requeued job finds its checkpoints.

Hydra's basic sweeper names each job's folder by every override of the job (``hydra.job.override_dirname``)
and resolves ``hydra.sweep.dir`` before ``HydraConfig`` is set, so a sweep folder that names the experiment
(``${hydra:runtime.choices.experiment}``) cannot be resolved at launch. This sweeper

- sets ``HydraConfig`` from the sweep's own config before the launcher is built, so ``hydra:`` interpolations
  in ``hydra.sweep.dir`` and in the launcher's settings resolve as they do in a single run, and
- gives each job ``hydra.sweep.subdir`` = its swept values (``estimator.k=64``, or
  ``estimator.k=64,seed=1`` for a grid), leaving out the fixed overrides of the command line (they hold for
  every job and are recorded in each run folder's ``config.yaml``) and ``exclude_keys`` (the experiment,
  which names the sweep folder itself).

Folder names are stable: the same command gives the same folders, with no timestamp.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import HydraContext, TaskFunction
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig


@dataclass
class StableSweeperConf:
    _target_: str = "hydra_plugins.knn_cm_sweeper.stable_sweeper.StableSweeper"
    max_batch_size: Optional[int] = None  # jobs per launcher call (None: all at once, e.g. one SLURM job array)
    params: Optional[dict] = None  # swept parameters from config files (`hydra.sweeper.params`), as in Hydra's
    #                                basic sweeper; the command line's sweeps are added to them
    exclude_keys: List[str] = field(default_factory=lambda: ["experiment"])  # swept keys not in folder names


ConfigStore.instance().store(group="hydra/sweeper", name="stable", node=StableSweeperConf, provider="knn_cm")


def subdir_name(job_overrides: Sequence[str], swept_keys: set[str], exclude_keys: Sequence[str]) -> str:
    """``key=value`` of the swept keys of one job, sorted by key and joined by commas; '/' becomes '_'."""
    parsed = OverridesParser.create().parse_overrides(list(job_overrides))
    items = sorted((override.get_key_element().lstrip("+~"), override.get_value_element_as_str())
                   for override in parsed if override.get_key_element().lstrip("+~") in swept_keys
                   and override.get_key_element().lstrip("+~") not in exclude_keys)
    return ",".join(f"{key}={value}" for key, value in items).replace(os.sep, "_")


def _quoted(text: str) -> str:
    """``text`` as a quoted value of Hydra's override grammar."""
    quote = "'" if "'" not in text else '"'
    return f"{quote}{text.replace(quote, '_')}{quote}"


class StableSweeper(BasicSweeper):
    """Hydra's basic sweeper (grids of ``key=a,b``, ``range()``, ``choice()``), with stable swept-value folders."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None,
                 exclude_keys: Sequence[str] = ("experiment",)) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.exclude_keys = list(exclude_keys)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        HydraConfig.instance().set_config(config)  # what Hydra's run mode does before resolving run.dir
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        swept_keys = {override.get_key_element().lstrip("+~") for override in overrides
                      if override.is_sweep_override()}
        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        return [[list(job) + [f"hydra.sweep.subdir={_quoted(subdir_name(job, swept_keys, self.exclude_keys))}"]
                 for job in batch] for batch in batches]

