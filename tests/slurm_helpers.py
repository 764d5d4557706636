"""Tests on a real SLURM scheduler: a fixture that skips when none answers, and small job helpers.

    @pytest.mark.slurm
    def test_something(slurm_cluster, slurm_jobs, tmp_path):
        job = slurm_jobs.submit(["--wrap", "echo hi"], cwd=tmp_path)   # sbatch arguments; returns the job id
        info = wait_for_state(job, "COMPLETED", timeout=60)           # scontrol show job fields
        assert "hi" in read_output(job)

``slurm_cluster`` (session) skips with a reason when ``sinfo`` is missing or no node answers; start the
project's local cluster with ``scripts/slurm_local.sh start`` (``.ci/run`` does). ``slurm_jobs`` cancels the
test's own jobs that are still queued or running at teardown, never anyone else's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
# States after which a job does not run again by itself (REQUEUED / PREEMPTED jobs go back to PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT"}
ANSWERING_NODE_STATES = ("idle", "mixed", "allocated", "completing")


@dataclass(frozen=True)
class SlurmCluster:
    """What the answering scheduler offers: the default partition, its first node and that node's CPUs."""

    partition: str
    node: str
    cpus: int
    accounting: bool


def _run(command: list[str], timeout: float = 15, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=check)


def find_cluster() -> SlurmCluster | str:
    """The answering cluster, or the reason why there is none (for a skip)."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (sinfo not found); start one with scripts/slurm_local.sh start --install"
    try:
        nodes = _run(["sinfo", "-h", "-o", "%P|%N|%c|%T"], timeout=10).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    except subprocess.CalledProcessError as error:
        return f"sinfo failed ({error.stderr.strip()[:200]}); start a cluster with scripts/slurm_local.sh start"
    for line in nodes:
        partition, node, cpus, state = line.split("|")
        if state.startswith(ANSWERING_NODE_STATES):
            accounting = _run(["sacct", "-n", "-X", "-j", "1"], timeout=10, check=False).returncode == 0
            return SlurmCluster(partition.rstrip("*"), node, int(cpus.rstrip("+")), accounting)
    return f"no SLURM node answers (sinfo: {' '.join(nodes) or 'no nodes'})"


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    found = find_cluster()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def submit(sbatch_args: list[str], cwd: str | Path, env: dict | None = None) -> str:
    """``sbatch --parsable ARGS`` from ``cwd`` (the job's submit dir); the job id. ``env`` defaults to ours."""
    result = subprocess.run(["sbatch", "--parsable", *sbatch_args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(sbatch_args)} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` fields (JobState, Restarts, ExitCode, StdOut, ...); None once the job is forgotten."""
    result = _run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if result.returncode != 0:
        return None
    return dict(re.findall(r"(\w[\w:/]*)=(\S*)", result.stdout))


def job_state(job_id: str) -> str:
    """The job's state (PENDING, RUNNING, COMPLETED, ...): scontrol, else sacct (accounting), else UNKNOWN."""
    info = job_info(job_id)
    if info is not None:
        return info["JobState"]
    result = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)], check=False)
    states = result.stdout.split()
    return states[0].split()[0] if result.returncode == 0 and states else "UNKNOWN"


def wait_for_state(job_id: str, states: str | set[str], timeout: float, poll: float = 0.5) -> dict[str, str]:
    """Wait until the job is in one of ``states``; its scontrol fields. Fails early, with the job's output,
    when it reaches another final state, and after ``timeout`` seconds."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline, state = time.monotonic() + timeout, "UNKNOWN"
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in wanted:
            return job_info(job_id) or {"JobState": state}
        if state in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended {state}, expected {sorted(wanted)}; output:\n"
                                 f"{tail(read_output(job_id))}")
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {state} after {timeout} s, expected {sorted(wanted)}; output:\n"
                       f"{tail(read_output(job_id))}")


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll ``predicate()`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def read_output(job_id: str, stream: str = "StdOut") -> str:
    """The job's output file (``stream``: StdOut or StdErr, as scontrol names them); "" when there is none yet."""
    info = job_info(job_id) or {}
    path = info.get(stream)
    if not path or not Path(path).exists():
        return ""
    return Path(path).read_text(errors="replace")


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def signal_running_job(job_id: str, signal_name: str, batch: bool = True, timeout: float = 60) -> None:
    """``scancel [--batch] --signal=NAME`` once the job RUNS (signalling a PENDING job can hang scancel ~90 s)."""
    wait_for_state(job_id, "RUNNING", timeout)
    _run(["scancel", *(["--batch"] if batch else []), f"--signal={signal_name}", str(job_id)])


@dataclass
class SlurmJobs:
    """The jobs one test submitted; ``cancel_leftovers`` cancels those still queued or running."""

    ids: list[str] = field(default_factory=list)

    def submit(self, sbatch_args: list[str], cwd: str | Path, env: dict | None = None) -> str:
        job_id = submit(sbatch_args, cwd, env)
        self.ids.append(job_id)
        return job_id

    def adopt(self, job_id: str) -> str:
        """Track a job submitted by other means (submitit, a campaign) so teardown cancels it."""
        self.ids.append(str(job_id))
        return str(job_id)

    def cancel_leftovers(self) -> None:
        leftovers = [job for job in self.ids if job_state(job) not in FINAL_STATES | {"UNKNOWN"}]
        if leftovers:
            _run(["scancel", *leftovers], check=False)


@pytest.fixture
def slurm_jobs(slurm_cluster):
    jobs = SlurmJobs()
    yield jobs
    jobs.cancel_leftovers()


def job_env(**extra: str) -> dict[str, str]:
    """Our environment for a job (sbatch exports it): the repository on PYTHONPATH, one thread per process."""
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | extra
