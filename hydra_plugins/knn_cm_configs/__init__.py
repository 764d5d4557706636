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
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

COMMON = "common"  # configs/common: the shared groups


def common_folder(app_folder: Path) -> Path | None:
    """``configs/common`` for an app folder ``configs/<app>`` of a knn-cm checkout, else None."""
    configs = app_folder.parent
    common = configs / COMMON
    is_checkout = configs.name == "configs" and (configs.parent / "knn_cm").is_dir()
    return common if is_checkout and common.is_dir() and app_folder != common else None


class CommonConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for entry in list(search_path.get_path()):
            path = (entry.path or "").removeprefix("file://")  # "main" is a bare path or a file:// one
            if entry.provider == "main" and path and "://" not in path:
                common = common_folder(Path(path).resolve())
                if common is not None:
                    search_path.append(provider="knn-cm", path=f"file://{common}")
                    return
