"""Experiments, launching and the report: every experiment composes and validates, launcher configs,
a killed run resumes when relaunched, and report.py on fixture run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from knn_cm.cli import APPS, CONFIGS, compose_app
from knn_cm.report import build_report
from knn_cm.training import EMA, list_checkpoints, trainer_config

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TINY = ["dataset=digits", "model=ncsnpp_tiny", "trainer.batch_size=8", "trainer.progress=false",
        "trainer.device=cpu", "trainer.objective.s1=20", "trainer.snapshot_every=null", "trainer.sample_every=null",
        "trainer.num_sample_images=4", "estimator.n=8"]


def _compose(config_name: str, overrides: list[str], hydra_config: bool = False):
    return compose_app(config_name, overrides, return_hydra_config=hydra_config)


# (app folder, experiment) for every experiment file of every app: configs/<app>/experiment/<name>.yaml
ALL_EXPERIMENTS = sorted((folder, path.stem) for folder in APPS.values()
                         for path in (CONFIGS / folder / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(("app", "experiment"), ALL_EXPERIMENTS, ids=[f"{a}/{e}" for a, e in ALL_EXPERIMENTS])
def test_every_experiment_composes_and_validates(app, experiment):
    overrides = [f"experiment={experiment}"] + (["run_name=x"] if app == "train" else [])
    config = _compose(app, overrides)
    if OmegaConf.is_missing(config.dataset, "path"):  # image-folder datasets name their folder on the command line
        config.dataset.path = "/data/images"
    resolved = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    assert resolved
    if app == "train":
        trainer_config(resolved["trainer"])  # validates the loop settings
        instantiate(config.trainer.objective)(estimator=object())  # validates solver, distance, curriculum
        instantiate(config.trainer.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        EMA(torch.nn.Linear(1, 1), **resolved["trainer"]["ema"])
        with torch.device("meta"):
            network = instantiate(config.model)
        assert network.img_resolution == config.dataset.resolution
        assert config.estimator.name in ("single", "stf", "knn")
    elif app == "estimator_study":
        assert config.study.num_sources >= 256 and len(config.study.times) >= 12
    else:
        assert config.task in ("checkpoints", "tswitch")


@pytest.mark.parametrize("launcher", ["slurm_a100", "slurm_local", "local"])
def test_launcher_configs_compose(launcher, monkeypatch):
    monkeypatch.setenv("KNN_CM_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("KNN_CM_SLURM_ACCOUNT", "lab")
    config = _compose("train", ["experiment=ict_knn", f"hydra/launcher={launcher}"], hydra_config=True)
    launcher_config = OmegaConf.to_container(config.hydra.launcher, resolve=False)
    assert launcher_config["_target_"].endswith("LocalLauncher" if launcher == "local" else "SlurmLauncher")
    if launcher != "local":
        config.hydra.job.name = "train"
        config.run_name = "ict_knn"
        resolved = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        assert resolved["max_num_timeout"] > 0 and resolved["signal_delay_s"] > 0
        assert resolved["submitit_folder"] == "multirun/train/ict_knn/.submitit/%j"
        if launcher == "slurm_a100":
            assert resolved["partition"] == "gpu" and resolved["account"] == "lab"
            assert resolved["tasks_per_node"] == resolved["gpus_per_node"] == 8
        else:  # slurm_local shares everything with slurm_a100 but the resources
            assert resolved["partition"] is None and resolved["gpus_per_node"] == 0 and resolved["cpus_per_task"] == 1
            a100 = OmegaConf.to_container(_compose("train", ["experiment=ict_knn", "hydra/launcher=slurm_a100"],
                                                   hydra_config=True).hydra.launcher, resolve=False)
            resources = {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
                         "partition", "account", "qos", "constraint"}
            assert {k: v for k, v in launcher_config.items() if k not in resources} == {
                k: v for k, v in a100.items() if k not in resources}


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def test_a_killed_run_resumes_when_relaunched(tmp_path):
    command = ["train.py", "experiment=quickstart", *TINY, "trainer.max_steps=300", "trainer.checkpoint_every=2",
               "trainer.log_every=2", f"hydra.run.dir={tmp_path}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([PYTHON, *command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "checkpoints" / "training-000000004.pt").exists():
            time.sleep(0.05)
    finally:  # whatever ends the wait, the run's whole process group goes
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = int(list_checkpoints(tmp_path)[-1].stem.split("-")[1])
    assert 4 <= killed_at < 300, "the run must be killed mid-training"
    result = _run(command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {list_checkpoints(tmp_path)[0].parent}" in (tmp_path / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 300 and list_checkpoints(tmp_path)[-1].name == "training-000000300.pt"


def _fake_run(folder: Path, max_steps: int, steps_done: int, evaluations: list[tuple[int, float, float]]):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"trainer:\n  max_steps: {max_steps}\n")
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "seconds_per_step": 2.0}) + "\n" for step in range(100, steps_done + 1, 100)))
    (folder / "evaluation.jsonl").write_text("".join(
        json.dumps({"step": step, "images_seen": step * 1024, "fid": fid, "isc_mean": isc, "num_samples": 50000,
                    "feature_extractor": "inception"}) + "\n" for step, fid, isc in evaluations))


def test_report_builds_tables_and_figures_and_marks_missing_runs(tmp_path):
    train_root, multirun = tmp_path / "train", tmp_path / "multirun"
    _fake_run(train_root / "ict", 400, 400, [(200, 5.1, 9.0), (400, 4.2, 9.2)])
    _fake_run(train_root / "ict_knn", 400, 300, [(200, 4.0, 9.3)])  # still training
    _fake_run(train_root / "figure4_baseline", 400, 400, [(200, 6.0, 8.0), (400, 5.0, 8.5)])
    _fake_run(multirun / "figure4_k" / "estimator.k=128", 400, 400, [(200, 5.5, 8.6), (400, 4.8, 8.8)])
    tswitch = tmp_path / "tswitch"
    tswitch.mkdir()
    (tswitch / "tswitch.csv").write_text("method,t_switch,num_samples,feature_extractor,fid\nknn,1.0,100,digits,3.0\n"
                                         "forward,1.0,100,digits,3.1\n")
    result = build_report(train_root, tmp_path / "report", multirun, tswitch)
    rows = {row["method"]: row for row in result["table1"]}
    assert rows["iCT (reimplemented)"]["fid"] == 4.2 and rows["iCT (reimplemented)"]["status"] == "complete"
    assert rows["iCT (reimplemented)"]["images_seen_mimg"] == pytest.approx(0.41) and rows[
        "iCT (reimplemented)"]["training_hours"] == pytest.approx(400 * 2 / 3600, abs=1e-3)
    assert rows["iCT + KNN (ours)"]["status"] == "partial: 300 of 400 steps"
    assert rows["iCT + STF"]["status"] == "missing" and rows["iCT + STF"].get("fid") is None
    markdown = (tmp_path / "report" / "table1.md").read_text()
    assert "missing" in markdown and "| iCT (reimplemented) | 4.200 | 9.20 |" in markdown
    assert all(row["status"] == "missing" for row in result["table2"])
    for name in ("table1.csv", "table2.csv", "table2.md", "figure4_k.png", "figure4_n.png", "figure5.png"):
        assert (tmp_path / "report" / name).exists(), name
    assert result["figure4_n"] == {"iCT baseline": [(0.2048, 6.0), (0.4096, 5.0)]}


def test_report_takes_the_best_fid_within_one_evaluation_setting(tmp_path):
    """A best FID is never taken across samplers or sample counts: a 2-step evaluation of one snapshot
    (FID 3.0) and a 10k-sample one (FID 2.0) do not replace the 1-step 50k curve's best (4.5)."""
    folder = tmp_path / "train" / "ict"
    _fake_run(folder, 400, 400, [(200, 5.0, 9.0), (400, 4.5, 9.1)])
    extra = [{"step": 400, "images_seen": 409600, "fid": 3.0, "isc_mean": 9.5, "num_samples": 50000,
              "feature_extractor": "inception", "sampler": "multistep", "sampler_settings": {"sigmas": [80.0, 0.8]}},
             {"step": 400, "images_seen": 409600, "fid": 2.0, "isc_mean": 9.6, "num_samples": 10000,
              "feature_extractor": "inception"}]
    with open(folder / "evaluation.jsonl", "a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in extra)
    result = build_report(tmp_path / "train", tmp_path / "report")
    row = next(row for row in result["table1"] if row["method"] == "iCT (reimplemented)")
    assert row["fid"] == 4.5 and row["num_samples"] == 50000 and row["best_step"] == 400


def test_report_at_digits_scale(tmp_path):
    _fake_run(tmp_path / "train" / "quickstart", 400, 400, [(400, 15.9, 8.1)])
    result = build_report(tmp_path / "train", tmp_path / "report", scale="digits")
    assert [row["status"] for row in result["table1"]] == ["missing", "missing", "complete"]
    assert not (tmp_path / "report" / "table2.md").exists()
    with pytest.raises(ValueError, match="scale"):
        build_report(tmp_path / "train", tmp_path / "report", scale="celeba")
