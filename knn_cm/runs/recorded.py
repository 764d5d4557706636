"""What a run says about itself, read as data: the config its folder holds (``config.yaml``) and the one each of its
network files carries (a snapshot's ``metadata["config"]``, written by train.py).

sample.py and evaluate.py take the dataset from there when the command line does not name one, so a CIFAR-10 run
is sampled and scored against CIFAR-10 without ``dataset=cifar10``. Only the ``dataset.store`` section is used, and
it is built by ``knn_cm.data.from_config`` (the project's own loaders only).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knn_cm.runs.layout import RunLayout


def run_config(run_dir: str | Path) -> dict | None:
    """A run folder's config.yaml as plain data (None when there is none); a ValueError when it is unreadable."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    return _config(path.read_text(), str(path))


def network_config(metadata: Mapping) -> dict | None:
    """The training config a network file's metadata carries (None for files from elsewhere, e.g. converted EDM
    checkpoints)."""
    text = metadata.get("config") if isinstance(metadata, Mapping) else None
    return _config(text, "the network file's metadata config") if isinstance(text, str) else None


def dataset_store(config: Mapping | None, where: str) -> dict | None:
    """The ``dataset.store`` section of a recorded config (None without a config); a ValueError naming ``where``
    when the config has none."""
    if config is None:
        return None
    store = (config.get("dataset") or {}).get("store") if isinstance(config.get("dataset"), Mapping) else None
    if not isinstance(store, Mapping):
        raise ValueError(f"{where} has no dataset.store section")
    return dict(store)


def _config(text: str, where: str) -> dict:
    try:
        config = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ValueError(f"{where} is not a readable run config ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a readable run config (it holds a {type(config).__name__})")
    return config


def trained_dataset(metadata: Mapping, network: str | Path, network_file: str | Path) -> tuple[dict, str] | None:
    """(the ``dataset.store`` a network was trained on, where it was read) from its file's metadata, else from the
    run folder ``network`` names (a folder's config.yaml); None for a network from elsewhere (a converted EDM
    checkpoint), whose dataset the command line or the app's config names."""
    recorded = dataset_store(network_config(metadata), f"{network_file} (metadata)")
    if recorded is not None:
        return recorded, str(network_file)
    if Path(network).is_dir():
        recorded = dataset_store(run_config(network), f"{network}/config.yaml")
        if recorded is not None:
            return recorded, f"{network}/config.yaml"
    return None
