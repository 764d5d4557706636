"""Sample images from a trained network, an estimator, or both (Section 6's hybrid sampler).

    python sample.py network=outputs/train/quickstart                       # the run's newest EMA snapshot
    python sample.py network=edm.pt dataset=cifar10 sampler.kind=hybrid sampler.t_switch=2
    python sample.py sampler.kind=pf_ode num_samples=16                     # the KNN estimator alone

Sample i uses seed seed_start + i, so networks and methods are compared on the same noise. The dataset (image
shape, and the data of the pf_ode / hybrid / forward samplers) is the one the network was trained on, read from
its file, unless ``dataset=`` is given. The run folder gets samples.npz (uint8 images [M, C, H, W] and seeds),
grid.png and config.yaml, written once every input has been checked; a call that fails leaves no folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from knn_cm.cli import given_on_command_line, one_line_errors, removed_on_failure, run_app
from knn_cm.data import float_to_uint8
from knn_cm.data.from_config import store_from_config
from knn_cm.device import as_device
from knn_cm.estimators import build_estimator
from knn_cm.io import atomic_path
from knn_cm.models import check_network_shape, load_network_file, network_from_payload
from knn_cm.runs.layout import resolve_network_path
from knn_cm.runs.recorded import trained_dataset
from knn_cm.sampling import generate, make_sampler, resolve_kind
from knn_cm.sampling.generate import USES_ESTIMATOR
from knn_cm.sampling.settings import check_sampler_settings
from knn_cm.settings import non_negative_int, positive_int
from knn_cm.training import save_image_grid

log = logging.getLogger("sample")


NETWORK_FREE = ("pf_ode", "flow_pf_ode")  # the samplers that integrate with the estimator alone


def run(config: DictConfig, run_dir: Path) -> torch.Tensor:
    """Samples [M, C, H, W] in [-1, 1] for a composed config, written into ``run_dir``.

    Every input is checked before anything is written; a call that fails leaves no folder of its own behind.
    """
    with removed_on_failure(run_dir):
        return _sample(config, Path(run_dir))


def _sample(config: DictConfig, run_dir: Path) -> torch.Tensor:
    num_samples = positive_int(config.num_samples, "num_samples")
    batch_size = positive_int(config.batch_size, "batch_size")
    seed_start = non_negative_int(config.seed_start, "seed_start")
    grid_images = non_negative_int(config.grid_images, "grid_images")
    device = as_device(config.device, "device")
    sampler = OmegaConf.to_container(config.sampler, resolve=True)
    path = payload = None
    if config.network is not None:
        path = resolve_network_path(config.network)
        payload = load_network_file(path, map_location=device)
    kind = resolve_kind(sampler.get("kind", "auto"), payload["precond_class"] if payload else None)
    if payload is None and kind not in NETWORK_FREE:
        error = ValueError(f"the {kind!r} sampler needs network=PATH (a training run folder or a network file)")
        error.add_note("python sample.py network=outputs/train/quickstart, or sampler.kind=pf_ode to sample with "
                       "the KNN estimator alone")
        raise error
    sampler = check_sampler_settings(sampler, kind) | {"kind": kind}
    store_config, taken_from = _dataset(config, payload, path)
    store = store_from_config(store_config, f"{taken_from}: dataset.store").with_xflip(False)
    network = None
    if payload is not None:
        check_network_shape(payload, path, store, taken_from)
        network = network_from_payload(payload, device, source=str(path))
        log.info("network %s (%s)", path, type(network).__name__)
    estimator = None
    if kind in USES_ESTIMATOR:
        estimator = build_estimator(OmegaConf.to_container(config.estimator, resolve=True), store, device)
    sample = make_sampler(network=network, estimator=estimator, store=store, **sampler)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = OmegaConf.to_container(config, resolve=True)
    if taken_from != "dataset":
        recorded["dataset"] = {"store": store_config, "taken_from": taken_from}
    with atomic_path(run_dir / "config.yaml") as temp:  # only once every input checked out
        temp.write_text(OmegaConf.to_yaml(recorded))
    seeds = list(range(seed_start, seed_start + num_samples))
    samples = generate(sample, seeds, store.shape, batch_size=batch_size, device=device, progress=True)
    with atomic_path(run_dir / "samples.npz") as temp, open(temp, "wb") as handle:
        np.savez_compressed(handle, images=float_to_uint8(samples).numpy(), seeds=np.asarray(seeds))
    wrote = "samples.npz"
    if grid_images:
        save_image_grid(samples[:grid_images], run_dir / "grid.png")
        wrote += f", grid.png ({min(grid_images, len(seeds))} images)"
    print(f"{len(seeds)} samples of {store.name} with the {kind!r} sampler in {run_dir}: {wrote}")
    return samples


def _dataset(config: DictConfig, payload: dict | None, path: Path | None) -> tuple[dict, str]:
    """(the ``dataset.store`` config to sample with, where it comes from): the command line's ``dataset`` when it
    names one, else the dataset the network was trained on, else the default dataset."""
    if payload is not None and not given_on_command_line("dataset"):
        recorded = trained_dataset(payload["metadata"], config.network, path)
        if recorded is not None:
            return recorded
    return OmegaConf.to_container(config.dataset.store, resolve=True), "dataset"


@hydra.main(config_path="configs/sample", config_name="sample", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    with one_line_errors():
        run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    run_app(main, __file__)
