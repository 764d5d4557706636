"""Evaluate trained networks: FID / IS against the training set and memorisation, per checkpoint or per t_switch.

    python evaluate.py run_dir=outputs/train/ict_knn                      # every snapshot; marks the best FID
    python evaluate.py run_dir=outputs/train/quickstart num_samples=2000  # digits: the digits classifier's features
    python evaluate.py experiment=tswitch_sweep tswitch.network=edm.pt    # Figure 5

task=checkpoints writes <run>/evaluation.jsonl (appended per snapshot; resumable: a snapshot is skipped only
when it was evaluated with the same content and settings), <run>/evaluation.csv (with the sampler settings;
the minimum-FID snapshot of each group of equal settings marked) and <run>/evaluate.log (appended); it leaves no
other folder. task=tswitch writes tswitch.csv and tswitch.png into its own folder.

The run folder's config.yaml is read as data: only its dataset section is used, and only the project's own
dataset loaders may be named there (knn_cm.data.from_config). metrics.feature_extractor=auto scores digits runs
in the project's digits classifier's features and every other dataset in Inception-v3's. The run folder is checked
first; a call that fails leaves no folder of its own behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from knn_cm.cli import given_on_command_line, move_job_log, one_line_errors, removed_on_failure, run_app
from knn_cm.data.from_config import store_from_config
from knn_cm.device import as_device
from knn_cm.estimators import build_estimator_set
from knn_cm.evaluation.run_evaluation import evaluate_run, prepare_metrics
from knn_cm.evaluation.tswitch import tswitch_sweep, write_tswitch
from knn_cm.models import check_network_shape, load_network_file, network_from_payload
from knn_cm.runs.layout import RunLayout, resolve_network_path
from knn_cm.runs.recorded import dataset_store, run_config, trained_dataset
from knn_cm.sampling.settings import check_sampler_settings
from knn_cm.settings import boolean, non_negative_int, positive_int

log = logging.getLogger("evaluate")
TASKS = ("checkpoints", "tswitch")
AUTO_KINDS = ("consistency", "heun", "flow_heun")  # what sampler.kind=auto may pick, by the network's kind


def run_dataset_config(run_dir: Path) -> dict | None:
    """The ``dataset.store`` section of a run folder's config.yaml (plain data), or None without one."""
    return dataset_store(run_config(run_dir), str(RunLayout(run_dir).config))


def training_store(config: DictConfig):
    """The training set to compare against: the run's own dataset config when the run folder has one."""
    if config.task == "checkpoints":
        store = run_dataset_config(Path(config.run_dir))
        if store is not None:
            return store_from_config(store, f"{Path(config.run_dir) / 'config.yaml'}: dataset.store").with_xflip(False)
    return store_from_config(OmegaConf.to_container(config.dataset.store, resolve=True),
                             "dataset.store").with_xflip(False)


def tswitch_store(config: DictConfig, payload: dict, network_file: Path) -> tuple:
    """task=tswitch: (the training set, where it was named): the command line's ``dataset`` when it names one, else
    the dataset the network was trained on (its file's metadata), else the config's (the experiment's)."""
    if not given_on_command_line("dataset"):
        recorded = trained_dataset(payload["metadata"], config.tswitch.network, network_file)
        if recorded is not None:
            store_config, taken_from = recorded
            return store_from_config(store_config, f"{taken_from}: dataset.store").with_xflip(False), taken_from
    return training_store(config), "dataset"


def check_run_dir(config: DictConfig) -> Path:
    """task=checkpoints: the run folder, checked before anything else is (it is the first thing a user gets wrong)."""
    if config.run_dir is None:
        error = ValueError("task=checkpoints needs run_dir=<training run folder>")
        error.add_note("python evaluate.py run_dir=outputs/train/quickstart")
        raise error
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={config.run_dir} is not a folder ({run_dir.absolute()} does not exist)")
    if not RunLayout(run_dir).list_snapshots():
        raise FileNotFoundError(f"run_dir={config.run_dir} has no snapshots/network-*.pt to evaluate "
                                f"(a training run writes them at trainer.snapshot_every and at its end)")
    return run_dir


def with_feature_extractor(metrics: dict, store) -> dict:
    """``metrics.feature_extractor: auto``: the project's digits classifier for digits, Inception-v3 otherwise."""
    if metrics.get("feature_extractor") in (None, "auto"):
        metrics = {**metrics, "feature_extractor": "digits" if store.name == "digits" else "inception"}
    return metrics


def run(config: DictConfig, output_dir: Path) -> list[dict]:
    """Evaluate a composed config; results go into the run folder (checkpoints) or ``output_dir`` (tswitch).

    A call that fails leaves no folder of its own behind (``output_dir`` is removed when it held only Hydra's log).
    """
    with removed_on_failure(output_dir):
        return _evaluate(config, Path(output_dir))


def _evaluate(config: DictConfig, output_dir: Path) -> list[dict]:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; allowed: {', '.join(TASKS)}")
    run_dir = check_run_dir(config) if config.task == "checkpoints" else None
    num_samples = positive_int(config.num_samples, "num_samples")
    batch_size = positive_int(config.batch_size, "batch_size")
    seed_start = non_negative_int(config.seed_start, "seed_start")
    progress = boolean(config.progress, "progress")
    device = as_device(config.device, "device")
    sampler = OmegaConf.to_container(config.sampler, resolve=True)
    for kind in AUTO_KINDS if sampler.get("kind", "auto") == "auto" else (sampler["kind"],):
        check_sampler_settings(sampler, kind)
    metrics = OmegaConf.to_container(config.metrics, resolve=True)
    if run_dir is not None:
        store = training_store(config)
        metrics = prepare_metrics(with_feature_extractor(metrics, store), num_samples)
        estimator = OmegaConf.to_container(config.estimator, resolve=True) if config.estimator is not None else None
        records = evaluate_run(run_dir, store, sampler, metrics, num_samples, seed_start, batch_size, device,
                               progress, estimator=estimator)
        print(evaluation_summary(records, run_dir))
        return records
    if config.tswitch.network is None:
        raise ValueError("task=tswitch needs tswitch.network=<a pretrained EDM network file or a run folder>")
    try:
        network_file = resolve_network_path(config.tswitch.network)  # a file, or a run folder's newest snapshot
    except FileNotFoundError as error:
        raise FileNotFoundError(f"tswitch.network={config.tswitch.network}: {error}") from None
    payload = load_network_file(network_file, map_location=device)
    store, taken_from = tswitch_store(config, payload, network_file)
    check_network_shape(payload, network_file, store, taken_from)
    metrics = prepare_metrics(with_feature_extractor(metrics, store), num_samples)
    network = network_from_payload(payload, device, source=str(network_file))
    estimators = build_estimator_set(OmegaConf.to_container(config.tswitch.estimators, resolve=True), store, device,
                                     setting="tswitch.estimators")
    schedule = {key: sampler[key] for key in ("num_steps", "sigma_min", "sigma_max", "rho")}
    rows = tswitch_sweep(network, store, estimators, list(config.tswitch.t_switch), metrics, num_samples,
                         include_forward=config.tswitch.include_forward, schedule=schedule,
                         seed_start=seed_start, batch_size=batch_size, device=device, progress=progress)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_tswitch(rows, output_dir)
    print(f"t_switch sweep of {network_file}: {RunLayout(output_dir).tswitch_table} and "
          f"{output_dir / 'tswitch.png'}")
    return rows


def evaluation_summary(records: list[dict], run_dir: Path, rows: int = 12) -> str:
    """A short table of this evaluation (step, FID, IS, memorised fraction; the newest ``rows`` snapshots and the
    best), the best snapshot, and where evaluation.csv is."""
    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}g}"

    best = min((r for r in records if r.get("fid") is not None), key=lambda r: r["fid"], default=None)
    shown = records[-rows:]
    if best is not None and best not in shown:
        shown = [best, *shown]
    lines = [f"{'step':>9}  {'FID':>8}  {'IS':>6}  {'memorised':>9}"]
    lines += [f"{r['step']:>9}  {number(r.get('fid')):>8}  {number(r.get('isc_mean'), 3):>6}  "
              f"{number(r.get('fraction_memorised'), 3):>9}" for r in shown]
    first = records[0] if records else {}
    head = (f"evaluated {len(records)} snapshot(s) of {run_dir} ({first.get('num_samples')} samples each, "
            f"{first.get('sampler')} sampler, {first.get('feature_extractor') or 'no'} features)")
    tail = [f"best: step {best['step']}, FID {best['fid']:.4g}"] if best is not None else []
    return "\n".join([head, *lines, *tail, f"table: {RunLayout(run_dir).evaluation_table}"])


@hydra.main(config_path="configs/evaluate", config_name="evaluate", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with one_line_errors():
        run(config, output_dir)
    if config.task == "checkpoints":  # the results are in the run folder: its log goes there too
        move_job_log(output_dir, RunLayout(Path(config.run_dir)).evaluation_log)


if __name__ == "__main__":
    run_app(main, __file__)
