"""Train a consistency model (iCT) or an EDM diffusion model with a pluggable score estimator.

    python train.py                                   # quickstart: iCT + KNN on digits, CPU, minutes
    python train.py experiment=ict_knn                # Table 1: iCT + KNN on CIFAR-10
    torchrun --nproc_per_node 8 train.py experiment=ict_knn           # one node, 8 GPUs
    python train.py -m experiment=ict_knn estimator.k=64,256,2048     # a sweep (hydra/launcher=... for SLURM)

Everything the run writes lands in its stable run folder: the resolved config, checkpoints
(trainer.resume=auto continues from the newest), EMA network snapshots, sample grids, metrics.jsonl.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from knn_cm.estimators import build_estimator
from knn_cm.io import atomic_path, remove_stale_temp_files
from knn_cm.training import EMA, DistributedContext, Trainer, trainer_config
from knn_cm.runs.checkpoints import remove_orphan_digests
from knn_cm.runs.binding import RunFolder, RunFolderError
from knn_cm.runs.layout import RunLayout
from knn_cm.training.state import refuse_restart_over_checkpoints

log = logging.getLogger("train")


def estimator_spec(config: DictConfig) -> dict:
    """The estimator group with the index group as its ``index`` (knn_cm.estimators.factory's schema).

    Every rank builds or loads its index at once, without a collective: cached kinds are built by the first
    process to take the cache entry's lock (one per node with a node-local cache, one per cluster with a shared
    one) while the others wait on the lock and then load the entry (``knn_cm.search.build_index``); a flat index
    is a copy of the data that each rank makes. ``index.device: null`` searches on this rank's device.
    """
    return {**OmegaConf.to_container(config.estimator, resolve=True),
            "index": OmegaConf.to_container(config.index, resolve=True)}


def run(config: DictConfig, run_dir: Path) -> Trainer:
    """Train with a composed config, writing into ``run_dir``; returns the trainer (weights, last step).

    Before anything is written, rank 0 validates the settings, takes the run folder's lock and checks that the
    folder belongs to this config and dataset (``knn_cm.runs.binding``); then it writes config.yaml.
    """
    context = DistributedContext.from_env(config.trainer.device, config.distributed.timeout_minutes,
                                          config.distributed.threads_per_rank)
    folder = RunFolder(run_dir)
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
        settings = trainer_config(resolved["trainer"])  # a bad setting fails here, before the folder is touched
        refusal, binding = None, None
        if context.is_main:
            try:
                folder.acquire()
            except RunFolderError as error:
                refusal = error
        store = instantiate(config.dataset.store)
        if context.is_main and refusal is None:
            try:
                binding = folder.check_binding(resolved, store.fingerprint, bool(config.accept_config_change),
                                               legacy_config=_legacy_config(run_dir))
                refuse_restart_over_checkpoints(run_dir, settings.resume)
            except (RunFolderError, ValueError) as error:
                refusal = error
        if context.any_true(refusal is not None):
            raise refusal or RunFolderError(f"rank 0 refused run folder {run_dir} (see its log)")
        invocation = None
        if context.is_main:
            folder.write_binding(binding)
            with atomic_path(RunLayout(run_dir).config) as temp:
                temp.write_text(OmegaConf.to_yaml(config, resolve=True))
            for stale in remove_stale_temp_files(run_dir):
                log.warning("removed %s, left by a process killed while writing it", stale)
            remove_orphan_digests(run_dir)
            invocation = folder.start_invocation({"overrides": _overrides(), "world_size": context.world_size,
                                                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
            log.info("dataset %s: N=%d, shape %s; run folder %s", store.name, len(store), store.shape, run_dir)
        estimator = build_estimator(estimator_spec(config), store, context.device, index_setting="index")
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        denoiser = instantiate(config.model)
        objective = instantiate(config.trainer.objective)(estimator=estimator)
        ema = config.trainer.ema

        def ema_factory(model):
            return EMA(model, **OmegaConf.to_container(ema, resolve=True))

        logger = None
        if context.is_main:
            logger = instantiate(config.logger)
            if callable(logger) and not hasattr(logger, "log"):  # a partial that needs the run folder
                logger = logger(run_dir=run_dir, config=resolved)
        trainer = Trainer(settings, run_dir, store, denoiser, objective, instantiate(config.trainer.optimizer),
                          ema_factory=ema_factory, context=context, logger=logger,
                          run_metadata={"config": OmegaConf.to_yaml(config, resolve=True)},
                          estimator_device=estimator.device, invocation=invocation)
        if context.is_main:
            parameters = sum(p.numel() for p in denoiser.parameters())
            log.info("%s: %.2fM parameters; %d steps of %d images (%d accumulation micro-steps x %d ranks)",
                     type(denoiser).__name__, parameters / 1e6, trainer.config.max_steps,
                     trainer.config.batch_size, trainer.accumulation, context.world_size)
        trainer.fit()
        return trainer
    finally:
        context.close()
        folder.release()


def _legacy_config(run_dir: Path) -> dict | None:
    """config.yaml of a run folder written before run.json existed (its binding is checked against it)."""
    layout = RunLayout(run_dir)
    path = layout.config
    if layout.binding.exists() or not path.exists():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _overrides() -> list[str]:
    """This invocation's command-line overrides (recorded per invocation in invocations.jsonl)."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
