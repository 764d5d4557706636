"""What a run folder guarantees once a run exists, tested with real faults.

- bound to one config and dataset: a relaunch with another lr or other data stops before writing anything;
- one process per folder: a second launch fails at once naming the holder's PID;
- crash consistency: ``kill -9`` during a checkpoint write and between a snapshot and its checkpoint, then the
  same command, ends bit-identical to an uninterrupted run with every snapshot present and each step logged
  once; a truncated, emptied or byte-flipped newest checkpoint is moved aside and the previous one used;
  non-finite gradients never reach a checkpoint; a full disk names itself and the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import train
from knn_cm.runs.binding import RunFolderError, invocation_seconds
from knn_cm.runs.checkpoints import save_checkpoint, verify_checkpoint
from knn_cm.training import ICTObjective, NonFiniteLossError, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=quickstart", "dataset=digits", "model=ncsnpp_tiny", "trainer.batch_size=8",
        "trainer.progress=false", "trainer.device=cpu", "trainer.objective.s1=20", "estimator.k=32", "estimator.n=8",
        "trainer.num_sample_images=4", "trainer.log_every=1", "run_name=run"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny(root: Path, steps: int, *extra: str) -> list[str]:
    return TINY + [f"output_root={root}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=2",
                   "trainer.snapshot_every=2", "trainer.sample_every=null", *extra]


def folder_state(folder: Path) -> dict:
    """Every file of a run folder (but the lock, which each launch takes) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def weights(path: Path) -> dict:
    state = load_checkpoint(path)
    return {f"{part}.{key}": value for part in ("model", "ema") for key, value in state[part].items()}


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------- binding
def test_a_relaunch_with_another_lr_is_refused_before_writing_anything(tmp_path):
    train.run(compose_train(tiny(tmp_path, 2)), tmp_path / "run")
    before = folder_state(tmp_path / "run")
    with pytest.raises(RunFolderError, match=r"trainer\.optimizer\.lr: 0\.0005 \(run\) -> 0\.001 \(this launch\)"
                                             r"(.|\n)*run_name=NEW_NAME(.|\n)*accept_config_change=true"):
        train.run(compose_train(tiny(tmp_path, 4, "trainer.optimizer.lr=1e-3")), tmp_path / "run")
    assert folder_state(tmp_path / "run") == before, "a refused launch must not write into the run folder"
    # Settings that may change between invocations do not count (resume, stop_after_steps, device, ...).
    train.run(compose_train(tiny(tmp_path, 2, "trainer.stop_after_steps=0", "trainer.micro_batch_size=4")),
              tmp_path / "run")
    # Continuing on purpose works and is recorded.
    trainer = train.run(compose_train(tiny(tmp_path, 4, "trainer.optimizer.lr=1e-3", "accept_config_change=true")),
                        tmp_path / "run")
    assert trainer.step == 4
    history = json.loads((tmp_path / "run" / "run.json").read_text())["history"]
    assert any("trainer.optimizer.lr: 0.0005 (run) -> 0.001" in change for change in history[-1]["changes"])


def test_a_relaunch_on_other_data_is_refused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(64, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    data = ["dataset=array", f"dataset.path={tmp_path / 'images.npy'}", "dataset.resolution=8", "dataset.channels=1"]
    train.run(compose_train(tiny(tmp_path, 2, *data)), tmp_path / "run")
    images[0] = 255 - images[0]  # the same config, edited data
    np.save(tmp_path / "images.npy", images)
    before = folder_state(tmp_path / "run")
    with pytest.raises(RunFolderError, match="dataset fingerprint: .* the training data differ"):
        train.run(compose_train(tiny(tmp_path, 2, *data)), tmp_path / "run")
    assert folder_state(tmp_path / "run") == before


def test_a_launch_that_fails_validation_writes_no_config(tmp_path):
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps=abc") as refused:  # typed schema
        train.run(compose_train(tiny(tmp_path, 2) + ["trainer.max_steps=abc"]), tmp_path / "fresh")
    assert "full_key: trainer.max_steps" in str(refused.value.__cause__)
    assert not (tmp_path / "fresh" / "config.yaml").exists()
    train.run(compose_train(tiny(tmp_path, 2)), tmp_path / "run")
    before = folder_state(tmp_path / "run")
    with pytest.raises(ValueError, match="trainer.batch_size must be >= 1, got 0"):
        train.run(compose_train(tiny(tmp_path, 2, "trainer.batch_size=0")), tmp_path / "run")
    assert folder_state(tmp_path / "run") == before


def test_resume_never_on_a_folder_with_checkpoints_refuses_and_keeps_everything(tmp_path):
    train.run(compose_train(tiny(tmp_path, 4)), tmp_path / "run")
    before = folder_state(tmp_path / "run")
    with pytest.raises(ValueError, match=r"trainer.resume=never, but run folder .* already has checkpoints .*"
                                         r"training-000000004\.pt"):
        train.run(compose_train(tiny(tmp_path, 4, "trainer.resume=never")), tmp_path / "run")
    assert folder_state(tmp_path / "run") == before


# ------------------------------------------------------------------------------------------ processes
class Launches:
    """The processes a test starts, each leading its own process group; on exit every group is killed
    (SIGKILL, also stopped ones) and every process reaped, whatever ended the test: a failed assertion, a
    ``communicate`` timeout, an interrupt. No test leaves a process behind."""

    def __init__(self):
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Launches:
        return self

    def start(self, argv: list[str]) -> subprocess.Popen:
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        self.processes.append(process)
        return process

    def train(self, overrides: list[str]) -> subprocess.Popen:
        """``python train.py <overrides>`` in its own process group."""
        return self.start([sys.executable, str(ROOT / "train.py"), *overrides])

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:  # every group first: one slow reap must not spare the others
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()  # not communicate(): a survivor holding the pipes would block it
            for pipe in (process.stdout, process.stderr):
                pipe.close()


@pytest.fixture
def launches():
    with Launches() as started:
        yield started


def newest_checkpoint(run: Path) -> int:
    """The step of the newest complete checkpoint in ``run`` (0 when there is none)."""
    checkpoints = list_checkpoints(run)
    return int(checkpoints[-1].stem.split("-")[1]) if checkpoints else 0


def finish(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300, interval: float = 0.0005) -> bool:
    """Poll ``condition()`` until true (True) or the process ends / time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(interval)
    return False


def test_every_launch_is_killed_with_its_group_when_a_test_fails(tmp_path):
    """A launch that outlives its test (here: a communicate() timeout), and the child it started, are killed."""
    child_pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(600)']); open({str(child_pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)")
    with pytest.raises(subprocess.TimeoutExpired):
        with Launches() as started:
            parent = started.start([sys.executable, "-c", script])
            assert wait_for(lambda: child_pid_file.exists() and child_pid_file.read_text(), parent, interval=0.01)
            finish(parent, timeout=0.1)
    assert parent.returncode == -signal.SIGKILL
    assert _exited(int(child_pid_file.read_text())), "the launch's child is killed with its group"


def _exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (killed, awaiting its new parent's reaping), polled up to 30 s;
    False if it still runs then."""
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "State:\tZ" in state:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_two_concurrent_launches_on_one_folder(tmp_path, launches):
    command = tiny(tmp_path, 10_000, "trainer.checkpoint_every=1000", "trainer.snapshot_every=null")
    first = launches.train(command)
    assert wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), first, interval=0.05)
    started = time.time()
    second = finish(launches.train(command), timeout=120)  # killed by ``launches`` if it times out
    assert second.returncode != 0
    assert f"is in use by another process (PID {first.pid} on" in second.stderr, second.stderr[-2000:]
    assert str(tmp_path / "run") in second.stderr
    assert time.time() - started < 60, "the second launch must fail at once, not after building everything"
    assert first.poll() is None, "the first launch keeps training"


def _stop_when(process: subprocess.Popen, condition, still_holds) -> bool:
    """SIGSTOP the process as soon as ``condition()``; kill -9 it if ``still_holds()`` then, else let it go on."""
    while wait_for(condition, process):
        os.killpg(process.pid, signal.SIGSTOP)
        if still_holds():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        os.killpg(process.pid, signal.SIGCONT)
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_and_before_a_checkpoint_then_the_same_command(tmp_path, launches):
    """Nothing due is lost and the end is bit-identical to an uninterrupted run."""
    steps = 12
    reference_process = launches.train(tiny(tmp_path / "reference", steps))  # the interpreter settings of the runs
    command = tiny(tmp_path, steps)
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    def writing_a_checkpoint():
        return any(p.name.startswith(".training-") and p.name.endswith(".tmp") for p in checkpoints.glob(".*"))

    first = launches.train(command)
    assert _stop_when(first, writing_a_checkpoint, writing_a_checkpoint), "no checkpoint write was caught"
    assert writing_a_checkpoint(), "killed mid-write: the temporary file is left behind"

    def newest_snapshot() -> int:
        snapshots = sorted((run / "snapshots").glob("network-*.pt"))
        return int(snapshots[-1].stem.split("-")[1]) if snapshots else 0

    before = newest_snapshot()  # the killed run's snapshot at the step whose checkpoint it was writing

    def snapshot_without_checkpoint():  # a snapshot this launch wrote, whose checkpoint is not written yet
        newest = newest_snapshot()
        return newest > before and not (checkpoints / f"training-{newest:09d}.pt").exists()

    newest_at_launch = [0, newest_checkpoint(run)]  # where each relaunch must resume
    second = launches.train(command)
    assert _stop_when(second, snapshot_without_checkpoint, snapshot_without_checkpoint), \
        "no kill between a snapshot and its checkpoint"

    newest_at_launch.append(newest_checkpoint(run))
    result = finish(launches.train(command))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left by a process killed while writing it" in (run / "train.log").read_text()
    assert not list(run.rglob("*.tmp")), "stale temporary files are removed"
    assert finish(reference_process).returncode == 0
    reference = tmp_path / "reference" / "run"
    assert_same_weights(list_checkpoints(run)[-1], list_checkpoints(reference)[-1])
    expected = [f"network-{step:09d}.pt" for step in range(2, steps + 1, 2)]
    assert sorted(p.name for p in (run / "snapshots").glob("*.pt")) == expected, "every snapshot is present"
    for name in expected:
        a = torch.load(run / "snapshots" / name, weights_only=True)["state_dict"]
        b = torch.load(reference / "snapshots" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(a[key], b[key]) for key in a), name
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), "each step is logged once"
    lines = [json.loads(line) for line in (run / "invocations.jsonl").read_text().splitlines()]
    assert len({line["id"] for line in lines}) == 3 and invocation_seconds(run) > 0
    final = {line["id"]: line for line in lines}  # each invocation's newest record, in launch order
    starts = [record.get("start_step", 0) for record in final.values()]
    # Each relaunch resumed from the newest checkpoint it found (not from scratch); the last one always finds
    # one, since the second launch was killed after a snapshot newer than the first launch's checkpoint write.
    assert starts == newest_at_launch and starts[2] > 0, f"the relaunches resumed: {starts} != {newest_at_launch}"
    assert all(record["resumed_from"].endswith(f"training-{record['start_step']:09d}.pt")
               for record in final.values() if record.get("start_step"))


# --------------------------------------------------------------------------------------- bad checkpoints
@pytest.mark.parametrize("damage", ["truncated", "emptied", "byte-flipped"])
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes(damage, tmp_path, caplog):
    straight = train.run(compose_train(tiny(tmp_path / "straight", 6)), tmp_path / "straight" / "run")
    train.run(compose_train(tiny(tmp_path, 6, "trainer.stop_after_steps=4")), tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "training-000000004.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "emptied":
        data = bytearray()
    else:
        data[len(data) // 2] ^= 0x40  # a tensor's byte: torch would load this silently
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        resumed = train.run(compose_train(tiny(tmp_path, 6)), tmp_path / "run")
    assert f"{newest} " in caplog.text and "moved it aside" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "training-000000004.pt.corrupt").exists(), "kept, not deleted"
    assert resumed.step == 6
    assert resumed.resumed_from.name == "training-000000002.pt" and resumed.start_step == 2, "not from scratch"
    assert_same_weights(list_checkpoints(tmp_path / "run")[-1], list_checkpoints(straight.run_dir)[-1])


def test_non_finite_gradients_with_a_finite_loss_never_reach_a_checkpoint(tmp_path, monkeypatch):
    original = ICTObjective.__call__

    def poisoned(self, net, x, step, random):
        loss, stats = original(self, net, x, step, random)
        if step == 3:  # finite value, NaN gradient (the where-sqrt trap)
            weight = next(net.parameters())
            loss = loss + torch.where(torch.tensor(True), torch.zeros(()), torch.sqrt(-weight.sum() ** 2 - 1))
        return loss, stats

    monkeypatch.setattr(ICTObjective, "__call__", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at step 3 .*newest checkpoint with finite "
                                                 r"weights is .*training-000000002\.pt"):
        train.run(compose_train(tiny(tmp_path, 6)), tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["training-000000002.pt"]
    assert all(torch.isfinite(v).all() for v in weights(list_checkpoints(tmp_path / "run")[-1]).values()
               if v.is_floating_point())


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_names_itself_and_the_path_and_keeps_earlier_checkpoints(small_tmpfs):
    state = {"model": {"w": torch.randn(256, 1024)}, "ema": {}, "optimizer": {}, "step": 0, "images_seen": 0,
             "generators": []}  # 1 MiB
    written = []
    with pytest.raises(OSError) as raised:
        for step in range(1, 20):
            written.append(save_checkpoint(small_tmpfs / "checkpoints" / f"training-{step:09d}.pt", state))
    assert raised.value.errno == errno.ENOSPC
    assert "no space left on device while writing" in str(raised.value) and str(small_tmpfs) in str(raised.value)
    assert len(written) >= 2 and all(verify_checkpoint(path) for path in written)
    assert not list(small_tmpfs.rglob("*.tmp")), "the failed write leaves no temporary file"
