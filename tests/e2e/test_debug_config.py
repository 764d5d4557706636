"""``debug=default``: any training experiment as a two-step CPU run on digits in a fresh temporary folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
TRAIN_EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "train" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", TRAIN_EXPERIMENTS)
def test_every_training_experiment_becomes_a_tiny_cpu_run(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        config = compose("train", overrides=[f"experiment={experiment}", "debug=default"], return_hydra_config=True)
    assert config.dataset.name == "digits" and config.trainer.max_steps == 2 and config.trainer.device == "cpu"
    assert config.model.network.model_channels == 8 and config.trainer.num_sample_images == 0
    assert config.output_root == f"{tmp_path}/knn-cm-debug"


def test_the_debug_command_trains_two_steps_outside_the_outputs_folder(tmp_path):
    completed = subprocess.run([sys.executable, "train.py", "experiment=ict_knn", "debug=default"], cwd=ROOT,
                               env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)},
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (run,) = (tmp_path / "knn-cm-debug").iterdir()
    assert run.name.startswith("ict_knn-") and (run / "checkpoints" / "training-000000002.pt").exists()
    assert (run / "snapshots" / "network-000000002.pt").exists() and not (run / "samples").exists()
