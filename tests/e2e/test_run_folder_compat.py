"""A run folder written before the layout moved (knn-cm at commit 9e503ed, tests/fixtures/run_folder_v0_1: the
quickstart with a tiny network, stopped at step 2 of 4) resumes with today's code under the same command."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import train
from knn_cm.runs import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "run_folder_v0_1"
# The command that made the fixture (run_name and output_root aside).
COMMAND = ["experiment=quickstart", "model=ncsnpp_tiny", "estimator.k=32", "estimator.n=8", "trainer.objective.s1=20",
           "trainer.max_steps=4", "trainer.batch_size=8", "trainer.device=cpu", "trainer.progress=false",
           "trainer.num_sample_images=4", "trainer.checkpoint_every=2", "trainer.snapshot_every=2",
           "trainer.sample_every=null", "trainer.log_every=1"]


def test_a_run_folder_made_before_the_move_resumes(tmp_path):
    run = tmp_path / "made_by_v0_1"
    shutil.copytree(FIXTURE, run)
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        config = compose("train", overrides=[*COMMAND, f"output_root={tmp_path}", "run_name=made_by_v0_1"])
    trainer = train.run(config, run)
    assert trainer.resumed_from.name == "training-000000002.pt" and trainer.start_step == 2 and trainer.step == 4
    assert [p.name for p in list_checkpoints(run)] == ["training-000000002.pt", "training-000000004.pt"]
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in (run / "snapshots").glob("*.pt")) == ["network-000000002.pt",
                                                                        "network-000000004.pt"]
