"""Multi-task DDP on CPU (gloo) under srun: 2 tasks of one job, from SLURM's (plain srun) or submitit's
environment. The ranks agree on rank, world size and master address, and two steps give the weights of one
process with the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from knn_cm.training import list_checkpoints, load_checkpoint
from tests.e2e.test_launch import TINY
from tests.slurm_helpers import ROOT, job_env, read_output, tail, wait_for_state

pytestmark = pytest.mark.slurm

DETERMINISTIC = ["trainer.objective._target_=tests.deterministic_objective.DeterministicICT"]
TRAIN = ["train.py", "experiment=quickstart", *TINY, *DETERMINISTIC, "trainer.max_steps=2"]
RANK_LINE = re.compile(r"rank (\d) of (\d+) \(local rank (\d)\), master (\S+):(\d+), device cpu")


def _env() -> dict[str, str]:
    """The job finds `python` (this interpreter's venv) and this checkout, as after `source .venv/bin/activate`."""
    return job_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert state["step"] == 2
    return {f"model.{k}": v for k, v in state["model"].items()} | {f"ema.{k}": v for k, v in state["ema"].items()}


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("reference")
    result = subprocess.run([sys.executable, *TRAIN, f"output_root={root}", "run_name=single"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_tensors(root / "single")


def _srun(slurm_jobs, tmp_path, monkeypatch) -> str:
    """docs/slurm.md: sbatch --ntasks-per-node=2 ... --wrap "srun python train.py ..." (one DDP rank per task)."""
    command = " ".join(["srun", "python", *TRAIN, f"output_root={tmp_path}", "run_name=ddp"])
    return slurm_jobs.submit(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=2G",
                              f"--output={tmp_path}/slurm-%j.out", "--wrap", command], cwd=ROOT, env=_env())


def _submitit(slurm_jobs, tmp_path, monkeypatch) -> str:
    """submitit's executor with tasks_per_node=2 (what hydra/launcher=slurm_* asks for): each task runs train.py
    in the task's environment (SUBMITIT_FOLDER, SLURM_*; sbatch exports ours, so the job finds this checkout)."""
    import submitit

    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=2, cpus_per_task=1, mem_gb=4, timeout_min=10)
    command = [sys.executable, *TRAIN, f"output_root={tmp_path}", "run_name=ddp"]
    job = executor.submit(submitit.helpers.CommandFunction(command, cwd=str(ROOT)))
    return slurm_jobs.adopt(job.job_id)


@pytest.mark.parametrize("launch", [_srun, _submitit], ids=["plain_srun", "submitit"])
def test_two_tasks_agree_on_the_process_group_and_match_one_process(launch, slurm_jobs, tmp_path, monkeypatch,
                                                                    single_process_reference):
    job = launch(slurm_jobs, tmp_path, monkeypatch)
    wait_for_state(job, "COMPLETED", timeout=240)
    log = (tmp_path / "ddp" / "train.log").read_text()
    reports = sorted(set(RANK_LINE.findall(log)))
    assert [(rank, world, local) for rank, world, local, _, _ in reports] == [("0", "2", "0"), ("1", "2", "1")], \
        tail(log) + read_output(job)
    assert len({(address, port) for *_, address, port in reports}) == 1, reports  # one master for both ranks
    assert reports[0][3] == os.uname().nodename.split(".")[0]  # the job's first node, from SLURM_JOB_NODELIST
    state = load_checkpoint(list_checkpoints(tmp_path / "ddp")[-1])
    assert state["world_size"] == 2 and state["images_seen"] == 2 * 8  # two steps of the global batch of 8
    ddp = _final_tensors(tmp_path / "ddp")
    assert ddp.keys() == single_process_reference.keys()
    for name, tensor in single_process_reference.items():
        assert torch.allclose(ddp[name], tensor, rtol=1e-5, atol=1e-6), name
