"""The project's local SLURM cluster (scripts/slurm_local.sh) and the test helpers, on a real scheduler."""

from __future__ import annotations

import subprocess

import pytest

from tests.slurm_helpers import SLURM_LOCAL, job_info, read_output, wait_for_state, wait_until

pytestmark = pytest.mark.slurm


def _status() -> tuple[int, dict[str, str]]:
    result = subprocess.run([str(SLURM_LOCAL), "status"], capture_output=True, text=True, timeout=30)
    return result.returncode, dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_status_reports_the_idle_node_and_its_daemons(slurm_cluster):
    code, status = _status()
    if status.get("conf_owner") != "own":
        pytest.skip("the answering scheduler is not the project's local cluster")
    assert code == 0 and status["node"] == slurm_cluster.node and status["partition"] == slurm_cluster.partition
    assert status["node_state"] in ("idle", "mixed", "allocated", "completing")
    assert all(status[f"daemon_{name}"].isdigit() for name in ("slurmctld", "slurmd"))
    assert status["accounting"] == ("slurmdbd" if slurm_cluster.accounting else "none")
    # start (as docs/slurm.md shows it) on a running cluster with its packages is a no-op that succeeds
    started = subprocess.run([str(SLURM_LOCAL), "start", "--install"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0 and "already running" in started.stderr
    assert _status()[1]["daemon_slurmctld"] == status["daemon_slurmctld"]


def test_start_refuses_to_overwrite_a_foreign_slurm_conf(tmp_path):
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=a-real-cluster\n")
    result = subprocess.run([str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KNN_CM_SLURM_CONF_DIR": str(tmp_path)})
    assert result.returncode == 1 and "was not written by this script" in result.stderr
    assert foreign.read_text() == "ClusterName=a-real-cluster\n"


def test_bad_settings_are_named():
    result = subprocess.run([str(SLURM_LOCAL), "start", "--fast"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "unknown option '--fast'" in result.stderr
    result = subprocess.run([str(SLURM_LOCAL), "restart"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "usage:" in result.stderr


def test_a_requeued_job_reruns_within_seconds(slurm_jobs, tmp_path):
    """cred_expire=5 and one-second scheduling: scontrol requeue -> the batch script runs again, Restarts=1."""
    job = slurm_jobs.submit(["--job-name=knn-cm-test-requeue", "--requeue", "--output=job.out", "--open-mode=append",
                             "--wrap", "echo run ${SLURM_RESTART_COUNT:-0}; "
                                       "if [ ${SLURM_RESTART_COUNT:-0} = 0 ]; then sleep 60; fi"], cwd=tmp_path)
    wait_until(lambda: "run 0" in read_output(job), 60, "the first run's output")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    info = wait_for_state(job, "COMPLETED", timeout=45)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    assert [line for line in read_output(job).splitlines() if line.startswith("run")] == ["run 0", "run 1"]
    assert job_info(job)["StdOut"] == str(tmp_path / "job.out")
