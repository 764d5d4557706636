"""slurm/train.sbatch submitted with plain sbatch on a real scheduler (CPU): two processes through torchrun,
the USR1 requeue of a one-process job (which runs without torchrun), and torchrun's restart of a killed worker."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from knn_cm.training import list_checkpoints, load_checkpoint
from tests.e2e.test_launch import TINY
from tests.slurm_helpers import ROOT, job_env, read_output, signal_running_job, wait_for_state, wait_until

pytestmark = pytest.mark.slurm

# docs/slurm.md: the CPU form of the template's command.
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=2", "--mem=4G", "slurm/train.sbatch", "experiment=quickstart"]


def _sbatch_env(**extra: str) -> dict[str, str]:
    """The interpreter running the tests (its venv's activate script) for the job, and this checkout's code."""
    return job_env(KNN_CM_PYTHON_ENV=str(Path(sys.executable).parent / "activate"), **extra)


def _submit_template(slurm_jobs, tmp_path, overrides: list[str], **env: str) -> str:
    sbatch = CPU_SBATCH[:-2] + [f"--output={tmp_path}/slurm-%x-%j.out"] + CPU_SBATCH[-2:]
    return slurm_jobs.submit([*sbatch, *TINY, f"output_root={tmp_path}", *overrides], cwd=ROOT,
                             env=_sbatch_env(**env))


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_sbatch_runs_two_steps_through_torchrun_on_cpu(slurm_jobs, tmp_path):
    """KNN_CM_NPROC_PER_NODE=2 on a CPU node: torchrun starts two gloo ranks that train together."""
    job = _submit_template(slurm_jobs, tmp_path, ["trainer.max_steps=2", "run_name=sbatch_cpu"],
                           KNN_CM_NPROC_PER_NODE="2")
    info = wait_for_state(job, "COMPLETED", timeout=240)
    output = read_output(job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert f"knn-cm: job {job} restart 0 on" in output and "1 node(s) x 2 process(es)" in output
    run_dir = tmp_path / "sbatch_cpu"
    log = (run_dir / "train.log").read_text()
    assert "rank 0 of 2 (local rank 0)" in log and "rank 1 of 2 (local rank 1)" in log  # torchrun's variables
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "training-000000002.pt"
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["world_size"] == 2
    assert (run_dir / "config.yaml").exists() and _steps(run_dir)[-1] == 2


def test_train_sbatch_usr1_requeues_and_resumes_in_the_same_run_folder(slurm_jobs, tmp_path):
    run_dir = tmp_path / "sbatch_usr1"
    job = _submit_template(slurm_jobs, tmp_path, ["trainer.max_steps=60", "trainer.checkpoint_every=2",
                                                  "trainer.log_every=2", "run_name=sbatch_usr1"])
    wait_until(lambda: list_checkpoints(run_dir), 180, "the first checkpoint")
    signal_running_job(job, "USR1")  # what SLURM sends 300 s before the time limit (--signal=B:USR1@300)
    info = wait_for_state(job, "COMPLETED", timeout=240)
    output = read_output(job)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    assert f"time limit or preemption: requeueing {job}" in output
    assert f"knn-cm: job {job} restart 0" in output and f"knn-cm: job {job} restart 1" in output
    log = (run_dir / "train.log").read_text()
    assert "stopped by SIGTERM" in log  # the requeue's SIGTERM: the running step was checkpointed
    resumed = re.search(r"resumed from \S+ \(step (\d+)", log)
    assert resumed and 2 <= int(resumed.group(1)) < 60, "the rerun continues from the first run's checkpoint"
    assert list_checkpoints(run_dir)[-1].name == "training-000000060.pt" and _steps(run_dir)[-1] == 60
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["sbatch_usr1"]  # one run folder


def _worker_pid(job: str, rank: int) -> int | None:
    """The torchrun worker of ``rank`` in SLURM job ``job`` on this node (the local cluster runs here)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if {f"SLURM_JOB_ID={job}".encode(), f"RANK={rank}".encode()} <= environ and any(
                item.startswith(b"TORCHELASTIC_RUN_ID=") for item in environ):
            return int(entry.name)
    return None


def test_train_sbatch_restarts_a_killed_worker_within_the_allocation(slurm_jobs, tmp_path):
    """kill -9 of one of two workers: torchrun (--max-restarts from KNN_CM_MAX_RESTARTS, 3 by default) starts the
    group again in the same allocation, it resumes from the newest checkpoint and the job completes; SLURM
    neither fails nor requeues it."""
    run_dir = tmp_path / "sbatch_restart"
    job = _submit_template(slurm_jobs, tmp_path, ["trainer.max_steps=40", "trainer.checkpoint_every=2",
                                                  "trainer.log_every=2", "run_name=sbatch_restart"],
                           KNN_CM_NPROC_PER_NODE="2")
    wait_until(lambda: len(list_checkpoints(run_dir)) >= 2, 180, "the second checkpoint")
    os.kill(wait_until(lambda: _worker_pid(job, 1), 30, "rank 1's process"), signal.SIGKILL)
    info = wait_for_state(job, "COMPLETED", timeout=240)
    output = read_output(job)
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0"
    assert "up to 3 worker restarts" in output and "failed (exitcode: -9)" in output
    resumed = re.search(r"resumed from \S+ \(step (\d+)", (run_dir / "train.log").read_text())
    assert resumed and 2 <= int(resumed.group(1)) < 40, "the restarted workers continue from a checkpoint"
    assert list_checkpoints(run_dir)[-1].name == "training-000000040.pt" and _steps(run_dir)[-1] == 40
