"""Multirun sweeps as the README and docs write them: they launch, and each job trains in a stable folder named by
the experiment and its swept values only.

The commands run exactly as documented, in a fresh working directory (no override of ``hydra.sweep.dir`` or
``run_name``: that override once hid a crash at launch). Sweeps of the CIFAR-10 experiments are checked through
Hydra's own multirun composition (master config, sweeper, per-job config): training them needs CIFAR-10 and a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf, open_dict

from knn_cm.training import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
README_SWEEP = "python train.py -m experiment=quickstart estimator.k=16,32 trainer.max_steps=2"  # README, Training


def run_documented(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a documented ``python <script> ...`` command line from ``cwd`` with this interpreter."""
    words = command.split()
    assert words[0] == "python"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / words[1]), *words[2:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_sweep_folders(cwd: Path, experiment: str, key: str, values: list[int]) -> None:
    sweep = cwd / "multirun" / "train" / experiment
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == sorted(f"{key}={value}" for value in values)
    for value in values:
        folder = sweep / f"{key}={value}"
        assert [p.name for p in list_checkpoints(folder)][-1] == "training-000000002.pt"
        assert OmegaConf.select(OmegaConf.load(folder / "config.yaml"), key) == value


@pytest.mark.slow
def test_readme_sweep_runs_as_written(tmp_path):
    """The acceptance command: two run folders with checkpoints, named by the swept value only."""
    assert README_SWEEP in (ROOT / "README.md").read_text()
    result = run_documented(README_SWEEP, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_sweep_folders(tmp_path, "quickstart", "estimator.k", [16, 32])
    assert (tmp_path / "multirun" / "train" / "quickstart" / "multirun.yaml").is_file()


@pytest.mark.slow
def test_sweep_through_the_local_submitit_launcher(tmp_path):
    """configs/common/hydra/launcher/local.yaml's own example (step count reduced), in parallel processes."""
    result = run_documented(README_SWEEP + " hydra/launcher=local", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_sweep_folders(tmp_path, "quickstart", "estimator.k", [16, 32])
    logs = list((tmp_path / "multirun" / "train" / "quickstart" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "submitit's logs sit in <sweep>/.submitit/<job id>/"


def sweep_job_folders(overrides: list[str], config_name: str = "train") -> tuple[str, list[str]]:
    """(sweep folder, job folders) as Hydra's multirun resolves them for ``python train.py -m <overrides>``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs" / config_name), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        master = hydra.compose_config(config_name, overrides, run_mode=RunMode.MULTIRUN,
                                      with_log_configuration=False)
        sweeper = Plugins.instance().instantiate_sweeper(
            config=master, hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=None),
            task_function=lambda config: None)
        sweep_dir = str(master.hydra.sweep.dir)  # what crashed at launch ("HydraConfig was not set")
        arguments = sweeper._parse_config() + list(master.hydra.overrides.task)
        batches = sweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
        folders = []
        for number, job in enumerate(batches[0]):
            job_config = hydra.config_loader.load_sweep_config(master, list(job))
            with open_dict(job_config):
                job_config.hydra.job.num = number  # as Hydra's launchers do
            HydraConfig.instance().set_config(job_config)  # as Hydra's run_job does
            folders.append(str(Path(job_config.hydra.sweep.dir) / str(job_config.hydra.sweep.subdir)))
        return sweep_dir, folders


@pytest.mark.parametrize("command, sweep_dir, folders", [
    ("python train.py -m experiment=ict_knn estimator.k=64,256,2048", "multirun/train/ict_knn",
     ["estimator.k=64", "estimator.k=256", "estimator.k=2048"]),
    ("python train.py -m experiment=figure4_k", "multirun/train/figure4_k",
     ["estimator.k=128", "estimator.k=512", "estimator.k=2048"]),
    ("python train.py -m experiment=figure4_n", "multirun/train/figure4_n",
     ["estimator.n=16", "estimator.n=64", "estimator.n=256"]),
    ("python train.py -m experiment=ict_knn hydra/launcher=slurm_a100", "multirun/train/ict_knn", [""]),
    ("python train.py -m experiment=ict_knn estimator.k=64,256 seed=0,1 trainer.max_steps=10",
     "multirun/train/ict_knn", ["estimator.k=64,seed=0", "estimator.k=64,seed=1", "estimator.k=256,seed=0",
                                "estimator.k=256,seed=1"]),
])
def test_documented_sweeps_resolve_stable_folders(command, sweep_dir, folders):
    """Swept values name the folders; fixed overrides (trainer.max_steps=10) and the experiment do not."""
    found_sweep, found = sweep_job_folders(command.split()[3:])
    assert found_sweep == sweep_dir
    assert found == [str(Path(sweep_dir) / name) for name in folders]


def test_the_estimator_study_sweep_of_docs_resolves():
    """docs/estimator_study.md: ``python evaluate_estimators.py -m estimators.knn.k=64,256``, one folder per value."""
    sweep_dir, folders = sweep_job_folders(["estimators.knn.k=64,256"], config_name="estimator_study")
    assert sweep_dir.startswith("multirun/estimator_study/digits/")
    assert folders == [f"{sweep_dir}/0", f"{sweep_dir}/1"]


def test_folder_names_sort_swept_keys_whatever_their_order_on_the_command_line():
    """``seed=0,1 estimator.k=64,256`` and ``estimator.k=64,256 seed=0,1`` are one sweep: the same folders
    (keys sorted), so a requeued job finds its checkpoints however the command was typed."""
    from hydra_plugins.knn_cm_sweeper.stable_sweeper import subdir_name

    keys = {"seed", "estimator.k", "experiment"}
    job = ["seed=0", "estimator.k=64", "experiment=ict_knn"]
    assert subdir_name(job, keys, ["experiment"]) == "estimator.k=64,seed=0"
    assert subdir_name(["estimator.k=64", "seed=0"], keys, []) == "estimator.k=64,seed=0"
    _, forward = sweep_job_folders("experiment=ict_knn estimator.k=64,256 seed=0,1".split())
    _, reverse = sweep_job_folders("experiment=ict_knn seed=0,1 estimator.k=64,256".split())
    assert sorted(reverse) == sorted(forward) and "multirun/train/ict_knn/estimator.k=64,seed=1" in reverse
