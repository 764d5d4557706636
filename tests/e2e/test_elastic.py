"""Real torchrun jobs on loopback (CPU, gloo): two nodes equal one, a killed worker's group restarts and resumes
bit-identically (three jobs in a row), and a stopped rank ends the job within the process-group timeout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from knn_cm.training import list_checkpoints, load_checkpoint
from tests.e2e.test_launch import TINY
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "elastic_worker.py")
STEPS = 30
# One CPU thread per rank in every job (CPU results may depend on the thread count; see
# tests/unit/training/test_distributed.py for the default per-rank share).
TRAIN = ["experiment=quickstart", *TINY, "trainer.checkpoint_every=2", "trainer.log_every=2",
         "trainer.keep_checkpoints=100", "distributed.threads_per_rank=1"]
DEADLINE = 240  # seconds a job of a few dozen tiny steps may take on a loaded 2-core machine




def _torchrun(run_dir: Path, port: int, *, nnodes: int = 1, nproc: int = 2, node_rank: int = 0,
              max_restarts: int = 0, steps: int = STEPS, extra: tuple[str, ...] = (),
              log: Path | None = None) -> subprocess.Popen:
    """One torchrun agent (a node) in its own session, output to ``log``."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
               f"--node_rank={node_rank}", f"--max-restarts={max_restarts}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{port}", "--monitor-interval=0.2",
               WORKER, *TRAIN, f"trainer.max_steps={steps}", *extra, f"hydra.run.dir={run_dir}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "KNN_CM_TEST_RESTART_DELAY": "3"}
    env.pop("OMP_NUM_THREADS", None)  # torchrun's default (1) then applies, as on a cluster
    handle = open(log or run_dir.with_suffix(".log"), "w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun's workers are not in its process group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _stop_everything(agents: list[subprocess.Popen]) -> None:
    """SIGKILL each agent's workers and the agent's process group; nothing is left behind."""
    for agent in agents:
        for pid in _descendants(agent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.wait()


def _worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    for pid in _descendants(agent.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent.pid}")


def _wait_for_checkpoint(run_dir: Path, step: int, agent: subprocess.Popen) -> None:
    path = run_dir / "checkpoints" / f"training-{step:09d}.pt"
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        assert agent.poll() is None, f"torchrun ended ({agent.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} within {DEADLINE} s"
        time.sleep(0.02)


def _final_state(run_dir: Path) -> dict:
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == f"training-{STEPS:09d}.pt", newest
    return load_checkpoint(newest)


def _assert_same_state(state: dict, reference: dict) -> None:
    """Weights, EMA, optimizer, counters and every rank's generators equal bit for bit."""
    for part in ("model", "ema"):
        assert state[part].keys() == reference[part].keys()
        for name in reference[part]:
            assert torch.equal(state[part][name], reference[part][name]), (part, name)
    for key, fields in reference["optimizer"]["state"].items():
        for field, value in fields.items():
            assert torch.equal(torch.as_tensor(state["optimizer"]["state"][key][field]), torch.as_tensor(value))
    assert (state["step"], state["images_seen"]) == (reference["step"], reference["images_seen"])
    assert len(state["generators"]) == len(reference["generators"]) == 2
    for mine, theirs in zip(state["generators"], reference["generators"]):
        assert mine.keys() == theirs.keys()
        for name in theirs:
            assert torch.equal(torch.as_tensor(mine[name]), torch.as_tensor(theirs[name])), name


def _finish(agents: list[subprocess.Popen], logs: list[Path]) -> None:
    for agent, log in zip(agents, logs):
        try:
            agent.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running after {DEADLINE} s:\n{log.read_text()[-4000:]}")
        assert agent.returncode == 0, log.read_text()[-6000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted job: one node, two processes."""
    run_dir = tmp_path_factory.mktemp("elastic") / "reference"
    agent = _torchrun(run_dir, free_port())
    try:
        _finish([agent], [run_dir.with_suffix(".log")])
    finally:
        _stop_everything([agent])
    return _final_state(run_dir)


@pytest.mark.slow
def test_two_nodes_end_with_the_weights_of_one_node_with_two_processes(reference, tmp_path):
    """Two torchrun agents (one process each) meeting at a loopback c10d rendezvous train like one node."""
    run_dir, port = tmp_path / "two_nodes", free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    agents = [_torchrun(run_dir, port, nnodes=2, nproc=1, node_rank=rank, log=logs[rank]) for rank in range(2)]
    try:
        _finish(agents, logs)
    finally:
        _stop_everything(agents)
    log = (run_dir / "train.log").read_text()
    assert "rank 0 of 2 (local rank 0)" in log and "rank 1 of 2 (local rank 0)" in log  # two nodes of one
    _assert_same_state(_final_state(run_dir), reference)


@pytest.mark.slow
@pytest.mark.parametrize("attempt, killed_rank", [(1, 1), (2, 0), (3, 1)])
def test_a_killed_worker_restarts_and_resumes_bit_identically(reference, tmp_path, attempt, killed_rank):
    """torchrun --max-restarts 1, kill -9 of one worker mid-run: the restarted group resumes from the newest
    checkpoint and ends on the uninterrupted job's state. Three jobs in a row (the restarted group's rank 1
    arrives 3 s late, tests/elastic_worker.py): before the fix a restart read the killed group's gloo
    addresses from torchrun's store in about half the tries (connection refused, or both ranks waiting)."""
    run_dir = tmp_path / "run"
    agent = _torchrun(run_dir, free_port(), max_restarts=1, extra=("distributed.timeout_minutes=2",))
    try:
        _wait_for_checkpoint(run_dir, 4, agent)
        os.kill(_worker_of_rank(agent, killed_rank), signal.SIGKILL)
        killed_at = int(list_checkpoints(run_dir)[-1].stem.split("-")[1])
        _finish([agent], [run_dir.with_suffix(".log")])
    finally:
        _stop_everything([agent])
    assert 4 <= killed_at < STEPS, "the worker must be killed mid-run"
    log = (run_dir / "train.log").read_text()
    resumed = [int(step) for step in re.findall(r"resumed from \S+ \(step (\d+)", log)]
    assert len(resumed) == 1 and killed_at <= resumed[0] < STEPS, (resumed, killed_at)
    assert "failed (exitcode: -9)" in run_dir.with_suffix(".log").read_text()  # torchrun saw the kill
    _assert_same_state(_final_state(run_dir), reference)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    """SIGSTOP of one worker: the other's next collective fails after distributed.timeout_minutes (here 0.2 min),
    and torchrun ends the job (non-zero) once it has killed the stopped worker (its SIGTERM grace is 30 s)."""
    run_dir, timeout_s, grace_s = tmp_path / "run", 12, 30
    agent = _torchrun(run_dir, free_port(), steps=100_000, extra=(f"distributed.timeout_minutes={timeout_s / 60}",))
    try:
        _wait_for_checkpoint(run_dir, 4, agent)
        os.kill(_worker_of_rank(agent, 1), signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            agent.wait(timeout=timeout_s + grace_s + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still holds its processes {time.monotonic() - stopped:.0f} s after the stop")
    finally:
        _stop_everything([agent])
    output = run_dir.with_suffix(".log").read_text()
    assert agent.returncode != 0, output[-4000:]
    assert "timeout 0.2 min" in (run_dir / "train.log").read_text()
    assert re.search(r"[Tt]imed out|timeout", output), output[-4000:]


# ---------------------------------------------------------------------------------------- slurm/train.sbatch
def _template_launch(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """slurm/train.sbatch run by bash as SLURM would run it, with ``srun`` and ``scontrol`` replaced by scripts that
    print what they are given (no scheduler needed; tests/slurm/test_slurm_train_sbatch.py submits it for real)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho node1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    environment = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
                                "KNN_CM_PYTHON_ENV": str(Path(sys.executable).parent / "activate"),
                                "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
                                "SLURM_GPUS_PER_NODE": "4"} | env
    return subprocess.run(["bash", str(ROOT / "slurm" / "train.sbatch"), "experiment=quickstart"], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("setting, expected", [(None, "3"), ("0", "0"), ("5", "5")])
def test_train_sbatch_restarts_a_failed_worker_group(tmp_path, setting, expected):
    """torchrun restarts the node's workers after a failure, KNN_CM_MAX_RESTARTS times (default 3)."""
    result = _template_launch(tmp_path, **({} if setting is None else {"KNN_CM_MAX_RESTARTS": setting}))
    assert result.returncode == 0, result.stderr
    launch = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert len(launch) == 1 and " torchrun " in launch[0] and f"--max-restarts={expected} " in launch[0], launch
    assert "--rdzv_backend=c10d --rdzv_endpoint=node1:24242" in launch[0]
    assert f"up to {expected} worker restarts" in result.stdout


def test_train_sbatch_refuses_a_bad_restart_count(tmp_path):
    result = _template_launch(tmp_path, KNN_CM_MAX_RESTARTS="three")
    assert result.returncode == 2 and "srun" not in result.stdout
    assert "KNN_CM_MAX_RESTARTS must be a whole number >= 0, got 'three'" in result.stderr
