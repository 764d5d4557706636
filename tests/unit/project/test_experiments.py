"""Experiment files hold only what they change: no value equal to the default it overrides, no group override
that picks the group's default, and a first line saying what the experiment runs.

A restated default pins a paper run to today's default: changing the default (the estimator's k, say) would then
change no paper run. Each training experiment is compared with what its defaults list alone composes: the app's
defaults, its parent experiment and its group overrides.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from knn_cm.cli import CONFIGS, compose_app

EXPERIMENTS = sorted((CONFIGS / "train" / "experiment").glob("*.yaml"))


def _defaults_overrides(entries) -> tuple[list[str], list[tuple[str, str]], str | None]:
    """(overrides composing the defaults list, its ``override /group: choice`` pairs, its parent experiment)."""
    overrides, group_overrides, parent = [], [], None
    for entry in entries or []:
        if isinstance(entry, str):
            parent = entry
            continue
        ((key, value),) = entry.items()
        if key.startswith("override /"):
            group = key.removeprefix("override /")
            overrides.append(f"{group}={value}")
            group_overrides.append((group, value))
        else:
            overrides.append(f"+{key.removeprefix('/')}={value}")
    return overrides, group_overrides, parent


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.stem)
def test_an_experiment_restates_no_default(path: Path):
    body = OmegaConf.to_container(OmegaConf.load(path))
    overrides, group_overrides, parent = _defaults_overrides(body.pop("defaults", []))
    body.pop("hydra", None)  # sweeps: values to run, not defaults
    base = ["run_name=check", f"experiment={parent}" if parent else "~experiment"]
    parent_choices = compose_app("train", base, return_hydra_config=True).hydra.runtime.choices
    restated = [f"override /{group}: {choice}" for group, choice in group_overrides
                if parent_choices.get(group) == choice]
    defaults = compose_app("train", [*base, *overrides])
    restated += [f"{key}: {value!r}" for key, value in _leaves(body)
                 if OmegaConf.select(defaults, key, default="<absent>") == value]
    assert restated == [], f"{path.name} restates defaults: {restated}"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.stem)
def test_an_experiment_starts_with_its_command_and_what_it_runs(path: Path):
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_", path.name
    assert lines[1].startswith("# python train.py ") and f"experiment={path.stem}" in lines[1].split(), path.name
    assert lines[2].startswith("# ") and len(lines[2]) > 20, f"{path.name}: line 3 says what it runs"
