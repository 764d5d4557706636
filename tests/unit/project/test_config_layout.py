"""configs/ has one folder per app (its primary config and its own groups) and configs/common for the groups
several apps compose; knn_cm.cli.APPS is the one map from app to folder, and every app's decorator agrees."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from hydra_plugins.knn_cm_configs import common_folder
from knn_cm.cli import APPS, CONFIGS

ROOT = Path(__file__).resolve().parents[3]


def _hydra_main_arguments(app: str) -> dict:
    tree = ast.parse((ROOT / app).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "main":
            return {keyword.arg: keyword.value.value for keyword in node.keywords}
    raise AssertionError(f"{app} has no @hydra.main")


@pytest.mark.parametrize("app", list(APPS))
def test_each_apps_decorator_names_its_folder_of_APPS(app):
    folder = APPS[app]
    assert _hydra_main_arguments(app) == {"config_path": f"configs/{folder}", "config_name": folder,
                                          "version_base": "1.3"}
    assert (CONFIGS / folder / f"{folder}.yaml").is_file()


def test_configs_holds_the_app_folders_and_common_only():
    assert {path.name for path in CONFIGS.iterdir() if path.is_dir()} == {*APPS.values(), "common"}
    assert not list(CONFIGS.glob("*.yaml"))  # no primary config outside its app's folder


def test_an_experiment_lives_in_one_app_only():
    names = [path.stem for folder in APPS.values() for path in (CONFIGS / folder / "experiment").glob("*.yaml")]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


def test_common_joins_only_a_knn_cm_checkouts_app_folders(tmp_path):
    assert common_folder(CONFIGS / "train") == CONFIGS / "common"
    assert common_folder(CONFIGS / "common") is None
    other = tmp_path / "configs" / "app"  # another project's layout of the same shape, without knn_cm/ beside it
    (other.parent / "common" / "dataset").mkdir(parents=True)
    other.mkdir()
    (other / "app.yaml").write_text("defaults:\n  - dataset: x\n")
    (other.parent / "common" / "dataset" / "x.yaml").write_text("name: x\n")
    assert common_folder(other) is None
    with initialize_config_dir(config_dir=str(other), version_base="1.3"), pytest.raises(MissingConfigException):
        compose("app")  # its search path is left as it was: common/ is not joined
