"""Evaluate trained networks: FID / IS against the training set and memorisation, per checkpoint or per t_switch.

    python evaluate.py run_dir=outputs/train/ict_knn                      # every snapshot; marks the best FID
    python evaluate.py run_dir=outputs/train/quickstart metrics.feature_extractor=digits num_samples=2000
    python evaluate.py experiment=tswitch_sweep tswitch.network=edm.pt    # Figure 5

task=checkpoints writes <run>/evaluation.jsonl (appended per snapshot; resumable) and <run>/evaluation.csv
(the minimum-FID snapshot marked). task=tswitch writes tswitch.csv and tswitch.png into its own folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from knn_cm.device import as_device
from knn_cm.evaluation.estimator_error import build_estimators
from knn_cm.evaluation.run_evaluation import evaluate_run
from knn_cm.evaluation.tswitch import tswitch_sweep, write_tswitch
from knn_cm.models import load_network

log = logging.getLogger("evaluate")
TASKS = ("checkpoints", "tswitch")


def training_store(config: DictConfig):
    """The training set to compare against: the run's own dataset config when the run folder has one."""
    dataset = config.dataset
    if config.task == "checkpoints" and (Path(config.run_dir) / "config.yaml").exists():
        dataset = OmegaConf.load(Path(config.run_dir) / "config.yaml").dataset
    return instantiate(dataset.store).with_xflip(False)


def run(config: DictConfig, output_dir: Path) -> list[dict]:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    device = as_device(config.device, "device")
    metrics = OmegaConf.to_container(config.metrics, resolve=True)
    sampler = OmegaConf.to_container(config.sampler, resolve=True)
    if config.task == "checkpoints":
        if config.run_dir is None:
            raise ValueError("task=checkpoints needs run_dir=<training run folder>")
        store = training_store(config)
        records = evaluate_run(config.run_dir, store, sampler, metrics, config.num_samples, config.seed_start,
                               config.batch_size, device, config.progress)
        best = min((r for r in records if r.get("fid") is not None), key=lambda r: r["fid"], default=None)
        if best is not None:
            log.info("best: step %s, FID %.4g (%d samples, %s)", best["step"], best["fid"], best["num_samples"],
                     best["feature_extractor"])
        return records
    if config.tswitch.network is None:
        raise ValueError("task=tswitch needs tswitch.network=<pretrained EDM network file>")
    store = training_store(config)
    network = load_network(config.tswitch.network, map_location=device)
    estimators = build_estimators(OmegaConf.to_container(config.tswitch.estimators, resolve=True), store,
                                  device=device)
    schedule = {key: sampler[key] for key in ("num_steps", "sigma_min", "sigma_max", "rho")}
    rows = tswitch_sweep(network, store, estimators, list(config.tswitch.t_switch), metrics, config.num_samples,
                         include_forward=config.tswitch.include_forward, schedule=schedule,
                         seed_start=config.seed_start, batch_size=config.batch_size, device=device,
                         progress=config.progress)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_tswitch(rows, output_dir)
    return rows


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
