"""Sample images from a trained network, an estimator, or both (Section 6's hybrid sampler).

    python sample.py network=outputs/train/quickstart                       # the run's newest EMA snapshot
    python sample.py network=edm.pt dataset=cifar10 sampler.kind=hybrid sampler.t_switch=2
    python sample.py sampler.kind=pf_ode num_samples=16                     # the KNN estimator alone

Sample i uses seed seed_start + i, so networks and methods are compared on the same noise. The run folder
gets samples.npz (uint8 images [M, C, H, W] and seeds), grid.png and config.yaml.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from knn_cm.data import float_to_uint8
from knn_cm.data.from_config import store_from_config
from knn_cm.device import as_device
from knn_cm.estimators import build_estimator
from knn_cm.runs.layout import resolve_network_path
from knn_cm.io import atomic_path
from knn_cm.models import load_network
from knn_cm.sampling import generate, make_sampler
from knn_cm.sampling.generate import USES_ESTIMATOR
from knn_cm.settings import non_negative_int, positive_int
from knn_cm.training import save_image_grid

log = logging.getLogger("sample")


def run(config: DictConfig, run_dir: Path) -> torch.Tensor:
    """Samples [M, C, H, W] in [-1, 1] for a composed config, written into ``run_dir``."""
    num_samples = positive_int(config.num_samples, "num_samples")
    batch_size = positive_int(config.batch_size, "batch_size")
    seed_start = non_negative_int(config.seed_start, "seed_start")
    grid_images = non_negative_int(config.grid_images, "grid_images")
    device = as_device(config.device, "device")
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "config.yaml") as temp:
        temp.write_text(OmegaConf.to_yaml(config, resolve=True))
    store = store_from_config(OmegaConf.to_container(config.dataset.store, resolve=True),
                              "dataset.store").with_xflip(False)
    network = None
    if config.network is not None:
        path = resolve_network_path(config.network)
        network = load_network(path, map_location=device)
        log.info("network %s (%s)", path, type(network).__name__)
    estimator = None
    if config.sampler.kind in USES_ESTIMATOR:
        estimator = build_estimator(OmegaConf.to_container(config.estimator, resolve=True), store, device)
    sampler = make_sampler(network=network, estimator=estimator, store=store,
                           **OmegaConf.to_container(config.sampler, resolve=True))
    seeds = list(range(seed_start, seed_start + num_samples))
    samples = generate(sampler, seeds, store.shape, batch_size=batch_size, device=device, progress=True)
    with atomic_path(run_dir / "samples.npz") as temp, open(temp, "wb") as handle:
        np.savez_compressed(handle, images=float_to_uint8(samples).numpy(), seeds=np.asarray(seeds))
    if grid_images:
        save_image_grid(samples[:grid_images], run_dir / "grid.png")
    log.info("wrote %d samples to %s", len(seeds), run_dir)
    return samples


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
