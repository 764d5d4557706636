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

Before the first job starts, the sweeper composes every job's config and runs the app's settings check on it
(``check``: a dotted path, ``knn_cm.training.checks.check_settings`` for train.py): one bad job refuses the whole
sweep, naming the job, and nothing is written (no sweep folder, no run folder). After the last job it prints a
table of the jobs' folders and outcomes, and fails when any job failed.
"""

import copy
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


@dataclass
class StableSweeperConf:
    _target_: str = "hydra_plugins.knn_cm_sweeper.stable_sweeper.StableSweeper"
    max_batch_size: int | None = None  # jobs per launcher call (None: all at once, e.g. one SLURM job array)
    params: dict | None = None  # swept parameters from config files (`hydra.sweeper.params`), as in Hydra's
    #                                basic sweeper; the command line's sweeps are added to them
    exclude_keys: list[str] = field(default_factory=lambda: ["experiment"])  # swept keys not in folder names
    check: str | None = None  # module.function(config) raising on bad settings, run on every job's config
    #                              before the first job starts (train.py: knn_cm.training.checks.check_settings)


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

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None,
                 exclude_keys: Sequence[str] = ("experiment",), check: str | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.exclude_keys = list(exclude_keys)
        self.check = check

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        HydraConfig.instance().set_config(config)  # what Hydra's run mode does before resolving run.dir
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        swept_keys = {override.get_key_element().lstrip("+~") for override in overrides
                      if override.is_sweep_override()}
        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        return [[list(job) + [f"hydra.sweep.subdir={_quoted(subdir_name(job, swept_keys, self.exclude_keys))}"]
                 for job in batch] for batch in batches]


    def sweep(self, arguments: list[str]) -> Any:
        """Hydra's basic sweep, with every job checked before the first starts and a table of outcomes at the end."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params = self._parse_config()
        params.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        self.check_jobs([job for batch in self.overrides for job in batch])
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[Sequence[JobReturn]] = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            if self.check is None:  # check_jobs composed every job already
                self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            initial_job_idx += len(batch)
            returns.append(results)
        outcomes = [result for results in returns for result in results]
        print(outcome_table(outcomes), flush=True)
        failed = [result for result in outcomes if result.status != JobStatus.COMPLETED]
        if failed:
            raise_first_failure(failed, len(outcomes))
        return returns

    def check_jobs(self, jobs: Sequence[Sequence[str]]) -> None:
        """Compose each job's config and run ``check`` on it; a ValueError naming the first bad job (and how many
        are bad) before anything is written."""
        if self.check is None:
            return
        module, _, name = self.check.rpartition(".")
        check: Callable[[DictConfig], Any] = getattr(importlib.import_module(module), name)
        loader = self.hydra_context.config_loader
        refused = []
        hydra_config = HydraConfig.instance().cfg
        try:
            for overrides in jobs:
                label = _job_label(overrides)
                try:
                    job_config = loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))
                    HydraConfig.instance().set_config(job_config)  # hydra: interpolations resolve as in the job
                    task_config = copy.deepcopy(job_config)
                    with read_write(task_config), open_dict(task_config):
                        del task_config["hydra"]
                    check(task_config)
                except Exception as error:
                    refused.append((label, error))
        finally:
            HydraConfig.instance().cfg = hydra_config
        if refused:
            from knn_cm.cli import describe  # an error's one-line message (a composition error's key and reason)

            label, error = refused[0]
            refusal = SweepRefused(f"job {label}: {describe(error)[0]}")
            others = ", ".join(other for other, _ in refused[1:4]) + (" ..." if len(refused) > 4 else "")
            refusal.add_note(f"{len(refused)} of {len(jobs)} jobs refused"
                             + (f" (also {others})" if len(refused) > 1 else "") + "; no job was started")
            raise refusal from error


class SweepRefused(ValueError):
    """A sweep whose jobs do not all pass the app's settings check (nothing was started)."""


class SweepFailed(RuntimeError):
    """A sweep in which some jobs failed (their outcomes are in the table printed before)."""


def _job_label(overrides: Sequence[str]) -> str:
    """The job's folder name (its ``hydra.sweep.subdir``), or its overrides."""
    for override in overrides:
        if override.startswith("hydra.sweep.subdir="):
            return override.split("=", 1)[1].strip("'\"") or "(no swept values)"
    return " ".join(overrides)


def _job_folder(result: JobReturn) -> str:
    folder = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir") if result.hydra_cfg is not None else None
    if folder is None:
        return _job_label(result.overrides or [])
    path = Path(folder)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _outcome(result: JobReturn) -> str:
    if result.status == JobStatus.COMPLETED:
        return "completed"
    error = result._return_value
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"failed: {message}"


def outcome_table(results: Sequence[JobReturn]) -> str:
    """One line per job: its folder and outcome (completed, or failed with the error's first line)."""
    folders = [_job_folder(result) for result in results]
    width = max((len(folder) for folder in folders), default=0)
    done = sum(result.status == JobStatus.COMPLETED for result in results)
    lines = [f"sweep: {done} of {len(results)} jobs completed"]
    lines += [f"  {folder:<{width}}  {_outcome(result)}" for folder, result in zip(folders, results)]
    return "\n".join(lines)


def raise_first_failure(failed: Sequence[JobReturn], total: int) -> None:
    """Re-raise a failed job's own error when it is a bug (its traceback matters), else a one-line summary."""
    from knn_cm.cli import is_known

    error = failed[0]._return_value
    if not isinstance(error, BaseException) or not is_known(error):
        raise error if isinstance(error, BaseException) else SweepFailed(f"job {_job_folder(failed[0])} failed")
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    summary = SweepFailed(f"{len(failed)} of {total} jobs failed; the first, {_job_folder(failed[0])}: {message}")
    raise summary from error
