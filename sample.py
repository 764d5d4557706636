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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from knn_cm.data import float_to_uint8
from knn_cm.evaluation.estimator_error import build_estimators
from knn_cm.device import as_device
from knn_cm.evaluation.snapshots import resolve_network_path
from knn_cm.io import atomic_path
from knn_cm.models import load_network
from knn_cm.sampling import generate, make_sampler
from knn_cm.training import save_image_grid

log = logging.getLogger("sample")


def run(config: DictConfig, run_dir: Path) -> torch.Tensor:
    """Samples [M, C, H, W] in [-1, 1] for a composed config, written into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
    device = as_device(config.device, "device")
    store = instantiate(config.dataset.store).with_xflip(False)
    network = None
    if config.network is not None:
        path = resolve_network_path(config.network)
        network = load_network(path, map_location=device)
        log.info("network %s (%s)", path, type(network).__name__)
    estimator = None
    if config.sampler.kind in ("pf_ode", "hybrid"):
        spec = OmegaConf.to_container(config.estimator, resolve=True)
        estimator = build_estimators({"estimator": spec}, store, device=device)["estimator"]
    sampler = make_sampler(network=network, estimator=estimator, store=store,
                           **OmegaConf.to_container(config.sampler, resolve=True))
    seeds = list(range(config.seed_start, config.seed_start + config.num_samples))
    samples = generate(sampler, seeds, store.shape, batch_size=config.batch_size, device=device, progress=True)
    with atomic_path(run_dir / "samples.npz") as temp, open(temp, "wb") as handle:
        np.savez_compressed(handle, images=float_to_uint8(samples).numpy(), seeds=np.asarray(seeds))
    save_image_grid(samples[: config.grid_images], run_dir / "grid.png")
    log.info("wrote %d samples to %s", len(seeds), run_dir)
    return samples


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(config: DictConfig) -> None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
