"""The groups several knn-cm apps compose: ``configs/common`` joins each app's config search path.

Each app has its own config folder, ``configs/<app>/``, holding its primary config and its own groups (its
``experiment`` group above all), so ``python train.py --help`` and Hydra's "available options" list only the
experiments train.py runs. The groups several apps compose (``dataset``, ``sampler``, ``hydra/launcher``) live
once in ``configs/common/``. Hydra imports every module under ``hydra_plugins`` before composing any config
(``@hydra.main`` and ``compose`` alike); this plugin then appends ``configs/common`` after the app's own folder.
It touches only a search path whose primary folder is an app folder of a knn-cm checkout
(``<checkout>/configs/<app>`` beside ``<checkout>/knn_cm``), so other Hydra apps in the same environment are left
as they are. The folder is found from the app's, not from this file's, so a
non-editable install of the package still finds the checkout's configs.

A user's package adds configs (an estimator's, an objective's, an experiment) without editing knn-cm: it declares an
entry point in the group ``knn_cm.configs`` naming itself, and holds ``configs/<app>/<group>/<option>.yaml`` in its
own folder; that ``configs/<app>`` is appended after knn-cm's, so it adds options and never shadows knn-cm's own
(docs/extending.md). The package is located, not imported.
"""

import importlib.util
from importlib.metadata import entry_points
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

COMMON = "common"  # configs/common: the shared groups
ENTRY_POINT_GROUP = "knn_cm.configs"  # installed packages holding configs/<app>/ folders for knn-cm's apps


def common_folder(app_folder: Path) -> Path | None:
    """``configs/common`` for an app folder ``configs/<app>`` of a knn-cm checkout, else None."""
    configs = app_folder.parent
    common = configs / COMMON
    is_checkout = configs.name == "configs" and (configs.parent / "knn_cm").is_dir()
    return common if is_checkout and common.is_dir() and app_folder != common else None


def package_config_folders(app: str) -> list[Path]:
    """``configs/<app>`` of every installed package with a ``knn_cm.configs`` entry point (its value: the package)."""
    folders = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        spec = importlib.util.find_spec(entry_point.module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if spec is not None and not locations and spec.origin:
            locations = [str(Path(spec.origin).parent)]
        folders += [Path(location) / "configs" / app for location in locations
                    if (Path(location) / "configs" / app).is_dir()]
    return folders


class CommonConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for entry in list(search_path.get_path()):
            path = (entry.path or "").removeprefix("file://")  # "main" is a bare path or a file:// one
            if entry.provider == "main" and path and "://" not in path:
                common = common_folder(Path(path).resolve())
                if common is not None:
                    search_path.append(provider="knn-cm", path=f"file://{common}")
                    for folder in package_config_folders(Path(path).name):
                        search_path.append(provider="knn-cm-extension", path=f"file://{folder}")
                    return
