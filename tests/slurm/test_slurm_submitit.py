"""Sweeps and preemption through hydra-submitit-launcher on a real SLURM cluster (``hydra/launcher=slurm_local``).

- a 2-value sweep runs as one job array; both run folders complete; submitit's logs sit in
  ``multirun/train/<experiment>/.submitit/<job id>/`` (docs/slurm.md);
- preemption: ``scontrol requeue`` (SIGTERM) and then ``scancel --signal=USR2`` (submitit's signal) while the
  job trains: each time the running step is checkpointed, the job is requeued and resumes in the same run
  folder, and its final weights equal an uninterrupted run's bit for bit;
- time limit: a 1-minute job with a signal delay is requeued by submitit's timeout handling and finishes across
  several allocations, each step in the metrics log once;
- a two-task DDP job: USR2 reaches both ranks, which stop at the same step and resume after the requeue.

The commands are the documented ones, run from a fresh folder (no ``hydra.sweep.dir`` override).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from knn_cm.training import list_checkpoints, load_checkpoint
from tests.slurm_helpers import job_env, job_info, signal_running_job, wait_for_state, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED_SWEEP = ("python train.py -m experiment=quickstart estimator.k=16,32 trainer.max_steps=2 "
                    "hydra/launcher=slurm_local")
TINY = ["model=ncsnpp_tiny", "trainer.batch_size=8", "trainer.progress=false", "trainer.device=cpu",
        "trainer.objective.s1=20", "estimator.k=32", "estimator.n=8", "trainer.num_sample_images=4",
        "trainer.snapshot_every=null", "trainer.sample_every=null", "trainer.log_every=1"]


def start(words: list[str], cwd: Path) -> subprocess.Popen:
    """``python <script> ...`` from ``cwd`` with this interpreter (submitit's jobs use it too)."""
    assert words[0] == "python"
    return subprocess.Popen([sys.executable, str(ROOT / words[1]), *words[2:]], cwd=cwd, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def submitit_job_ids(sweep: Path) -> list[str]:
    """The job ids that submitit made log folders for: an array's tasks (``<array>_<task>``), or one job."""
    folder = sweep / ".submitit"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return [n for n in names if re.fullmatch(r"\d+_\d+", n)] or [n for n in names if re.fullmatch(r"\d+", n)]


def test_a_sweep_runs_as_a_job_array(slurm_cluster, slurm_jobs, tmp_path):
    process = start(DOCUMENTED_SWEEP.split(), tmp_path)
    sweep = tmp_path / "multirun" / "train" / "quickstart"
    try:
        ids = wait_until(lambda: len(submitit_job_ids(sweep)) == 2 and submitit_job_ids(sweep), 600,
                         "the array's two tasks")
        for job in ids:
            slurm_jobs.adopt(job)
        finish(process, timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    array_ids = {job.split("_")[0] for job in ids}
    assert len(array_ids) == 1 and sorted(job.split("_")[1] for job in ids) == ["0", "1"], ids
    for k in (16, 32):
        folder = sweep / f"estimator.k={k}"
        assert list_checkpoints(folder)[-1].name == "training-000000002.pt"
    for job in ids:
        logs = sweep / ".submitit" / job
        assert (logs / f"{job}_0_log.out").is_file() and (logs / f"{job}_0_result.pkl").is_file()
        assert "Job completed successfully" in (logs / f"{job}_0_log.out").read_text() + (
            logs / f"{job}_0_log.err").read_text()


def uninterrupted(tmp_path: Path, overrides: list[str]) -> Path:
    """The same training in one local process (same interpreter settings): its final checkpoint."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"output_root={tmp_path}",
                             "run_name=reference", "trainer.preemption_signals=[]"], cwd=tmp_path, env=job_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return list_checkpoints(tmp_path / "reference")[-1]


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first), load_checkpoint(second)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_preemption_by_requeue_then_by_usr2_checkpoints_requeues_and_resumes_bit_identically(slurm_cluster,
                                                                                            slurm_jobs, tmp_path):
    """One job, preempted twice while it trains: ``scontrol requeue`` (SLURM's SIGTERM), then, once it trains
    again, ``scancel --signal=USR2`` (submitit's signal, to the job's steps)."""
    steps = 80
    overrides = ["experiment=quickstart", *TINY, f"trainer.max_steps={steps}", "trainer.checkpoint_every=1000"]
    process = start(["python", "train.py", "-m", *overrides, "hydra/launcher=slurm_local"], tmp_path)
    sweep = tmp_path / "multirun" / "train" / "quickstart"
    metrics, log_file = sweep / "metrics.jsonl", sweep / "train.log"

    def trained_beyond(step: int) -> bool:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return bool(lines) and json.loads(lines[-1])["step"] >= step

    try:
        job = slurm_jobs.adopt(wait_until(lambda: submitit_job_ids(sweep), 600, "the job to start")[0])
        wait_until(lambda: trained_beyond(3), 300, "training steps")
        wait_for_state(job, "RUNNING", 60)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        wait_until(lambda: log_file.read_text().count("resumed from") == 1, 300, "the requeued job to resume")
        first = int(re.search(r"stopped by SIGTERM at step (\d+)", log_file.read_text()).group(1))
        wait_until(lambda: trained_beyond(first + 3), 300, "training after the first resume")
        signal_running_job(job, "USR2", batch=False)  # submitit's jobs are srun steps
        finish(process, timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    log = log_file.read_text()
    stops = re.findall(r"stopped by (SIG\w+) at step (\d+)", log)
    assert [name for name, _ in stops] == ["SIGTERM", "SIGUSR2"], log[-3000:]
    for _, step in stops:  # the running step was checkpointed and is where the next allocation starts
        assert 3 <= int(step) < steps
        assert f"resumed from {sweep / 'checkpoints' / f'training-{int(step):09d}.pt'}" in log
    assert int(job_info(job)["Restarts"]) == 2, "the same job was requeued twice"
    assert list_checkpoints(sweep)[-1].name == f"training-{steps:09d}.pt"
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), "each step logged once"
    assert_same_weights(list_checkpoints(sweep)[-1], uninterrupted(tmp_path, overrides))


def test_a_time_limit_is_met_by_requeues_across_allocations(slurm_cluster, slurm_jobs, tmp_path):
    """SLURM sends the signal when at most signal_delay_s + 30 s remain (slurmctld checks every 30 s): with a
    1-minute limit and 5 s, 25-55 s into each allocation, after start-up. 240 steps of at least 0.25 s
    (tests/slow_objective.py) need 60 s, so the run needs several allocations on any machine."""
    steps = 240
    overrides = ["experiment=quickstart", *TINY, f"trainer.max_steps={steps}", "trainer.checkpoint_every=1000",
                 "trainer.log_every=10", "trainer.objective._target_=tests.slow_objective.SlowICT"]
    process = start(["python", "train.py", "-m", *overrides, "hydra/launcher=slurm_local",
                     "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5"], tmp_path)
    sweep = tmp_path / "multirun" / "train" / "quickstart"
    try:
        job = slurm_jobs.adopt(wait_until(lambda: submitit_job_ids(sweep), 600, "the job to start")[0])
        finish(process, timeout=1200)
    finally:
        if process.poll() is None:
            process.kill()
    restarts = int(job_info(job)["Restarts"])
    assert restarts >= 1, "the job needed more than one allocation"
    log = (sweep / "train.log").read_text()
    assert log.count("stopped by SIGUSR2") == restarts and log.count("resumed from") == restarts
    submitit_log = "".join((sweep / ".submitit" / job / f"{job}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert "this job is timed-out" in submitit_log and "Requeued job" in submitit_log
    logged = [json.loads(line)["step"] for line in (sweep / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len(set(logged)) and logged[-1] == steps, "each step once, to the end"
    assert list_checkpoints(sweep)[-1].name == f"training-{steps:09d}.pt"


def test_usr2_reaches_every_rank_of_a_two_task_job_and_the_requeued_job_finishes(slurm_cluster, slurm_jobs,
                                                                                 tmp_path):
    """hydra/launcher=slurm_local with tasks_per_node=2 (gloo DDP): submitit's USR2 reaches both ranks, they stop
    at the same step, rank 0 checkpoints and requeues, and the requeued job resumes on both ranks to the end
    (the weights of one process with the same global batch, with a noise-free loss; tests/slurm/test_slurm_ddp.py)."""
    steps = 40
    deterministic = "trainer.objective._target_=tests.deterministic_objective.DeterministicICT"
    overrides = ["experiment=quickstart", *TINY, deterministic, f"trainer.max_steps={steps}",
                 "trainer.checkpoint_every=1000"]
    process = start(["python", "train.py", "-m", *overrides, "hydra/launcher=slurm_local",
                     "hydra.launcher.tasks_per_node=2"], tmp_path)
    sweep = tmp_path / "multirun" / "train" / "quickstart"
    try:
        job = slurm_jobs.adopt(wait_until(lambda: submitit_job_ids(sweep), 600, "the job to start")[0])
        metrics = sweep / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 300, "training steps")
        signal_running_job(job, "USR2", batch=False)
        finish(process, timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    log = (sweep / "train.log").read_text()
    main = re.search(r"stopped by SIGUSR2 at step (\d+)", log)
    assert main, log[-3000:]
    step = int(main.group(1))
    assert f"rank 1 stopped by SIGUSR2 at step {step}" in log, "the signal reached rank 1, which stopped with rank 0"
    assert int(job_info(job)["Restarts"]) >= 1
    assert log.count("rank 1 of 2 (local rank 1)") >= 2, "both allocations ran two ranks"
    state = load_checkpoint(list_checkpoints(sweep)[-1])
    assert state["step"] == steps and state["world_size"] == 2
    reference = load_checkpoint(uninterrupted(tmp_path, overrides))
    for key, tensor in reference["model"].items():
        assert torch.allclose(state["model"][key], tensor, rtol=1e-5, atol=1e-6), key
