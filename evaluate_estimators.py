"""Estimator-error study (Section 4.2): each estimator's MSE, squared bias and variance against the exact
posterior mean, over noise levels; results.csv, Figure-3-style PNGs and a markdown summary in the run folder.

    python evaluate_estimators.py                                   # digits, single / stf / knn
    python evaluate_estimators.py experiment=cifar10_reduced
    python evaluate_estimators.py experiment=figure6_k_sweep dataset=cifar10
    python evaluate_estimators.py experiment=flow_matching_cifar10_reduced   # velocity targets (t in (0, 1))
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from knn_cm.cli import one_line_errors, removed_on_failure, run_app
from knn_cm.device import as_device
from knn_cm.estimators import build_estimator_set
from knn_cm.evaluation import estimator_error_study, markdown_table, plot_study, write_csv
from knn_cm.evaluation.estimator_error import METRICS, TARGETS, VELOCITY_TARGETS
from knn_cm.evaluation.study_plot import plot_velocity_study, study_title
from knn_cm.evaluation.velocity_error import velocity_error_study
from knn_cm.io import atomic_path
from knn_cm.settings import positive_int

log = logging.getLogger("evaluate_estimators")
PROCESSES = ("ve", "flow_matching")


def run(config: DictConfig, run_dir: Path) -> list[dict]:
    """The study for a composed config, written into ``run_dir``; returns the result rows.

    The settings, the dataset and the estimators are checked before config.yaml is written; a call that fails
    leaves no folder of its own behind.
    """
    with removed_on_failure(run_dir):
        return _study(config, Path(run_dir))


def _study(config: DictConfig, run_dir: Path) -> list[dict]:
    study = config.study
    process = study.get("process", "ve")
    if process not in PROCESSES:
        raise ValueError(f"study.process must be one of {', '.join(PROCESSES)}, got {process!r}")
    for key in ("num_sources", "repeats", "batch_size"):
        positive_int(study[key], f"study.{key}")
    as_device(study.device, "study.device")
    times = list(study.times)
    low, high = (0.0, math.inf) if process == "ve" else (0.0, 1.0)
    if not times or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and low < t < high
                            for t in times):
        allowed = "noise levels > 0" if process == "ve" else "flow-matching times in (0, 1)"
        raise ValueError(f"study.times must be a non-empty list of {allowed}, got {times}")
    store = instantiate(config.dataset.store)
    log.info("dataset %s: N=%d, d=%d", store.name, len(store), store.dim)
    estimators = build_estimator_set(OmegaConf.to_container(config.estimators, resolve=True), store, study.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "config.yaml") as temp:
        temp.write_text(OmegaConf.to_yaml(config, resolve=True))
    # ve: t is the noise level (Figure 3); flow_matching: t is flow-matching time and targets are velocities.
    study_function, plot, targets = ((estimator_error_study, plot_study, TARGETS) if process == "ve" else
                                     (velocity_error_study, plot_velocity_study, VELOCITY_TARGETS))
    rows = study_function(store, estimators, list(study.times), num_sources=study.num_sources,
                          repeats=study.repeats, batch_size=study.batch_size, seed=study.seed,
                          device=study.device, progress=study.progress)
    write_csv(rows, run_dir / "results.csv")
    title = study_title(f"{store.name} (N={len(store)})", study.num_sources, study.repeats, process)
    plot(rows, run_dir / "estimator_error.png", title=title)
    summary = "\n\n".join(f"## {target} {metric}\n\n" + markdown_table(rows, target, metric)
                          for target in targets for metric in METRICS)
    (run_dir / "summary.md").write_text(f"# {title}\n\n{summary}\n")
    return rows


@hydra.main(config_path="configs/estimator_study", config_name="estimator_study", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    with one_line_errors():
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        rows = run(config, run_dir)
        print(markdown_table(rows))
        print(f"wrote results.csv, estimator_error.png and summary.md in {run_dir}")


if __name__ == "__main__":
    run_app(main, __file__)
