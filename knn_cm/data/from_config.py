"""Building a DataStore from a dataset config without letting the config choose code to run.

A dataset config (``configs/common/dataset/*.yaml``, or the ``dataset`` section of a run folder's ``config.yaml``)
names its loader in ``store._target_``. :func:`store_from_config` treats that as data: the target must be
one of the project's own dataset loaders (:data:`DATASET_LOADERS`), every other entry must be a plain
value (number, string, bool, None, or a list of them) naming one of the loader's arguments, and the
loader is called directly (no ``hydra.utils.instantiate``, so no nested ``_target_`` is ever built).
Anything else is refused with an error naming the setting and the target.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from knn_cm.data.sources import load_array, load_cifar10, load_digits, load_image_folder
from knn_cm.data.store import DataStore

DATASET_LOADERS = {f"knn_cm.data.{loader.__name__}": loader
                   for loader in (load_digits, load_cifar10, load_image_folder, load_array)}
_ALIASES = {f"knn_cm.data.sources.{loader.__name__}": name for name, loader in DATASET_LOADERS.items()}
_IGNORED_KEYS = ("_convert_", "_recursive_")  # Hydra flags with no effect on a call of plain values


class UntrustedTargetError(ValueError):
    """A config asked for a ``_target_`` outside the allow-list."""


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(item) and not isinstance(item, (list, tuple))
                                                    for item in value)


def store_from_config(config: Mapping, setting: str = "dataset.store") -> DataStore:
    """The DataStore described by ``config`` (a resolved ``dataset.store`` mapping).

    Args:
        config: ``{"_target_": "knn_cm.data.load_digits", "xflip": false, ...}``.
        setting: where the config came from, for error messages (e.g. "run_dir/config.yaml: dataset.store").

    Raises:
        UntrustedTargetError: the target is not one of the project's dataset loaders.
        ValueError: an entry is not a plain value or not an argument of the loader.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{setting} must be a mapping with a _target_, got {type(config).__name__}")
    target = config.get("_target_")
    target = _ALIASES.get(target, target)
    if target not in DATASET_LOADERS:
        raise UntrustedTargetError(f"{setting}._target_={target!r} is refused: configs are data and may only name "
                                   f"the project's dataset loaders ({', '.join(DATASET_LOADERS)})")
    loader = DATASET_LOADERS[target]
    parameters = set(inspect.signature(loader).parameters)
    kwargs = {}
    for key, value in config.items():
        if key == "_target_" or key in _IGNORED_KEYS:
            continue
        if key not in parameters:
            allowed = ", ".join(sorted(parameters))
            raise ValueError(f"{setting}.{key} is not an argument of {target}; allowed: {allowed}")
        if not _plain(value):
            raise ValueError(f"{setting}.{key} must be a plain value (number, string, bool, null or a list of them), "
                             f"got {type(value).__name__}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return loader(**kwargs)
