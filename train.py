"""Train a consistency model (iCT) or an EDM diffusion model with a pluggable score estimator.

    python train.py                                   # quickstart: iCT + KNN on digits, CPU, minutes
    python train.py experiment=ict_knn                # Table 1: iCT + KNN on CIFAR-10
    torchrun --nproc_per_node 8 train.py experiment=ict_knn           # one node, 8 GPUs
    python train.py -m experiment=ict_knn estimator.k=64,256,2048     # a sweep (hydra/launcher=... for SLURM)

Everything the run writes lands in its stable run folder: the resolved config, checkpoints
(trainer.resume=auto continues from the newest), EMA network snapshots, sample grids, metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import manual_seed  # not `import torch`: see _submitit_note below

from knn_cm.cli import one_line_errors, removed_on_failure, run_app
from knn_cm.estimators import build_estimator
from knn_cm.runs.binding import RunFolder
from knn_cm.runs.jsonl import read_json_lines
from knn_cm.runs.layout import RunLayout
from knn_cm.training import EMA, DistributedContext, Trainer
from knn_cm.training.checks import FITTED_KEYS, check_settings, estimator_spec, fit_to_dataset
from knn_cm.training.loggers import open_logger

log = logging.getLogger("train")


def run(config: DictConfig, run_dir: Path) -> Trainer:
    """Train with a composed config, writing into ``run_dir``; returns the trainer (weights, last step).

    Settings first, without data (``knn_cm.training.checks``); then rank 0 claims the run folder (its lock, its
    config, no restart over checkpoints: ``RunFolder.claim``), still before the data load. Then the dataset, the
    settings it bounds fitted to it (``estimator.k`` > N becomes N, stated and recorded), the estimator, network
    and objective; rank 0 binds the folder (the dataset checked, run.json and config.yaml written:
    ``RunFolder.bind``); then the loop. A refusal on rank 0 stops every rank; a folder this call created is
    removed when a check fails. Each rank builds or loads its index itself (cached kinds once per cache, under a
    lock: ``knn_cm.search.build_index``).
    """
    with removed_on_failure(run_dir):  # a refused device leaves no folder: no rank writes into it before this ends
        context = DistributedContext.from_env(config.trainer.device, config.distributed.timeout_minutes,
                                              config.distributed.threads_per_rank)
    folder = RunFolder(run_dir)
    try:
        main_only = removed_on_failure if context.is_main else lambda *args, **kwargs: contextlib.nullcontext()
        with main_only(run_dir):
            settings = check_settings(config)
        context.on_main(lambda: folder.claim(OmegaConf.to_container(config, resolve=True),
                                             bool(config.accept_config_change), settings.resume,
                                             deferred=FITTED_KEYS),
                        refused=f"rank 0 refused run folder {run_dir}")
        with main_only(run_dir, own=(RunLayout(run_dir).lock.name,)):  # the lock alone: a fresh folder
            store = instantiate(config.dataset.store)
            for change in fit_to_dataset(config, len(store)):
                if context.is_main:
                    log.warning(change)
            estimator = build_estimator(estimator_spec(config), store, context.device, index_setting="index")
            manual_seed(config.seed)  # identical initial weights on every rank
            denoiser = instantiate(config.model)
            objective = instantiate(config.trainer.objective)(estimator=estimator)
        resolved = OmegaConf.to_container(config, resolve=True)
        invocation = context.on_main(lambda: folder.bind(
            resolved, OmegaConf.to_yaml(config, resolve=True), store.fingerprint, bool(config.accept_config_change),
            {"overrides": _overrides(), "world_size": context.world_size,
             "slurm_job_id": os.environ.get("SLURM_JOB_ID")}), refused=f"rank 0 refused run folder {run_dir}")
        logger = open_logger(instantiate(config.logger), run_dir, resolved) if context.is_main else None
        ema = OmegaConf.to_container(config.trainer.ema, resolve=True)
        trainer = Trainer(settings, run_dir, store, denoiser, objective, instantiate(config.trainer.optimizer),
                          ema_factory=lambda model: EMA(model, **ema), context=context, logger=logger,
                          run_metadata={"config": OmegaConf.to_yaml(config, resolve=True)},
                          estimator_device=estimator.device, invocation=invocation)
        if context.is_main:
            log.info("dataset %s: N=%d, shape %s; run folder %s", store.name, len(store), store.shape, run_dir)
            log.info("%s: %.2fM parameters; %d steps of %d images (%d accumulation micro-steps x %d ranks)",
                     type(denoiser).__name__, sum(p.numel() for p in denoiser.parameters()) / 1e6,
                     settings.max_steps, settings.batch_size, trainer.accumulation, context.world_size)
        trainer.fit()
        if context.is_main:
            print(run_summary(trainer, run_dir, store.name), flush=True)
        return trainer
    finally:
        context.close()
        folder.release()


def run_summary(trainer: Trainer, run_dir: Path, dataset: str) -> str:
    """What this call made and what comes next: the run's state, its folder, newest snapshot and sample grid, the
    last loss, and the sample.py / evaluate.py commands for it (two-step sampling for a consistency model)."""
    layout, step, max_steps = RunLayout(run_dir), trainer.step, trainer.config.max_steps
    if trainer.start_step >= max_steps:
        head = f"this run had already finished (step {step} of {max_steps}); nothing to train"
    elif step >= max_steps:
        head = f"finished: step {step} of {max_steps}"
    else:
        head = f"stopped at step {step} of {max_steps}; the same command continues"
    where = _shown(run_dir)
    lines = [head, f"  run folder:      {where}"]
    snapshots = layout.list_snapshots()
    if snapshots:
        lines.append(f"  newest snapshot: {_shown(snapshots[-1][1])}")
    grids = sorted(layout.samples.glob("*.png"), key=lambda path: (path.stem.rsplit("-", 1)[-1], path.name))
    if grids:
        lines.append(f"  sample grid:     {_shown(grids[-1])}")
    losses = [record for record in read_json_lines(layout.metrics) if record.get("loss") is not None]
    if losses:
        lines.append(f"  last loss:       {losses[-1]['loss']:.4g} (step {losses[-1].get('step')})")
    if snapshots:
        small = " num_samples=2000" if dataset == "digits" else ""
        lines += [f"  sample:          python sample.py network={where}{_two_steps(trainer.objective)}",
                  f"  evaluate:        python evaluate.py run_dir={where}{small}"]
    return "\n".join(lines)


def _two_steps(objective) -> str:
    """For a consistency objective (one with a two-step sample grid): the sample.py setting of its two-step sampling,
    sigma_max then iCT's intermediate noise level 0.821 (the ``twostep`` grids of knn_cm.training.ict); else ""."""
    if "twostep" not in objective.samplers():
        return ""
    return f" sampler.sigmas=[{objective.sigma_max:g},0.821]"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# _submitit_note: hydra/launcher=local and the SLURM launchers pickle this file's functions by value (it runs as
# __main__), and cloudpickle then also pickles each loaded submodule of a module they reference whose name parts
# all occur among their names: with `torch` referenced, torch.distributed.config (from `config.distributed` and
# `.config`), one of torch's config modules, which cannot be pickled. So these functions do not reference torch.


def _overrides() -> list[str]:
    """This invocation's command-line overrides (recorded per invocation in invocations.jsonl)."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


@hydra.main(config_path="configs/train", config_name="train", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    with one_line_errors():
        run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    run_app(main, __file__)
