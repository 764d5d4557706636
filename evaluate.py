"""Evaluate trained networks: FID / IS against the training set and memorisation, per checkpoint or per t_switch.

    python evaluate.py run_dir=outputs/train/ict_knn                      # every snapshot; marks the best FID
    python evaluate.py run_dir=outputs/train/quickstart metrics.feature_extractor=digits num_samples=2000
    python evaluate.py experiment=tswitch_sweep tswitch.network=edm.pt    # Figure 5

task=checkpoints writes <run>/evaluation.jsonl (appended per snapshot; resumable: a snapshot is skipped only
when it was evaluated with the same content and settings) and <run>/evaluation.csv (with the sampler settings;
the minimum-FID snapshot of each group of equal settings marked). task=tswitch writes tswitch.csv and
tswitch.png into its own folder.

The run folder's config.yaml is read as data: only its dataset section is used, and only the project's own
dataset loaders may be named there (knn_cm.data.from_config).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knn_cm.data.from_config import store_from_config
from knn_cm.device import as_device
from knn_cm.estimators import build_estimator_set
from knn_cm.evaluation.run_evaluation import evaluate_run, prepare_metrics
from knn_cm.evaluation.tswitch import tswitch_sweep, write_tswitch
from knn_cm.models import load_network
from knn_cm.runs.layout import RunLayout
from knn_cm.settings import boolean, non_negative_int, positive_int

log = logging.getLogger("evaluate")
TASKS = ("checkpoints", "tswitch")


def run_dataset_config(run_dir: Path) -> dict | None:
    """The ``dataset.store`` section of a run folder's config.yaml (plain data), or None without one."""
    path = RunLayout(run_dir).config
    if not path.exists():
        return None
    try:
        run_config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise ValueError(f"{path} is not a readable run config ({str(error).splitlines()[0]})") from None
    store = (run_config.get("dataset") or {}).get("store") if isinstance(run_config, dict) else None
    if store is None:
        raise ValueError(f"{path} has no dataset.store section")
    return store


def training_store(config: DictConfig):
    """The training set to compare against: the run's own dataset config when the run folder has one."""
    if config.task == "checkpoints":
        store = run_dataset_config(Path(config.run_dir))
        if store is not None:
            return store_from_config(store, f"{Path(config.run_dir) / 'config.yaml'}: dataset.store").with_xflip(False)
    return store_from_config(OmegaConf.to_container(config.dataset.store, resolve=True),
                             "dataset.store").with_xflip(False)


def run(config: DictConfig, output_dir: Path) -> list[dict]:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    num_samples = positive_int(config.num_samples, "num_samples")
    batch_size = positive_int(config.batch_size, "batch_size")
    seed_start = non_negative_int(config.seed_start, "seed_start")
    progress = boolean(config.progress, "progress")
    device = as_device(config.device, "device")
    metrics = prepare_metrics(OmegaConf.to_container(config.metrics, resolve=True), num_samples)
    sampler = OmegaConf.to_container(config.sampler, resolve=True)
    if config.task == "checkpoints":
        if config.run_dir is None:
            raise ValueError("task=checkpoints needs run_dir=<training run folder>")
        if not Path(config.run_dir).is_dir():
            raise FileNotFoundError(f"run_dir={config.run_dir} is not a folder")
        store = training_store(config)
        estimator = OmegaConf.to_container(config.estimator, resolve=True) if config.estimator is not None else None
        records = evaluate_run(config.run_dir, store, sampler, metrics, num_samples, seed_start, batch_size, device,
                               progress, estimator=estimator)
        best = min((r for r in records if r.get("fid") is not None), key=lambda r: r["fid"], default=None)
        if best is not None:
            log.info("best: step %s, FID %.4g (%d samples, %s)", best["step"], best["fid"], best["num_samples"],
                     best["feature_extractor"])
        return records
    if config.tswitch.network is None:
        raise ValueError("task=tswitch needs tswitch.network=<pretrained EDM network file>")
    store = training_store(config)
    network = load_network(config.tswitch.network, map_location=device)
    estimators = build_estimator_set(OmegaConf.to_container(config.tswitch.estimators, resolve=True), store, device,
                                     setting="tswitch.estimators")
    schedule = {key: sampler[key] for key in ("num_steps", "sigma_min", "sigma_max", "rho")}
    rows = tswitch_sweep(network, store, estimators, list(config.tswitch.t_switch), metrics, num_samples,
                         include_forward=config.tswitch.include_forward, schedule=schedule,
                         seed_start=seed_start, batch_size=batch_size, device=device, progress=progress)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_tswitch(rows, output_dir)
    return rows


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
