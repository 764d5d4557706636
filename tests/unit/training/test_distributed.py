"""knn_cm.training.distributed on CPU: the CUDA device of each rank and the refusal to train on the CPU when GPUs
are allocated (torch.cuda mocked), CPU threads per rank, host-side flags on a gloo group, and the per-start key
namespace in torchrun's store."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knn_cm.training import distributed
from knn_cm.training.distributed import (
    GPU_ALLOCATION_VARIABLES,
    DistributedContext,
    cuda_device_index,
    default_threads_per_rank,
    gpus_allocated,
)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
                    "SLURM_CPUS_PER_TASK", "SLURM_STEP_NUM_TASKS", "SUBMITIT_FOLDER", "OMP_NUM_THREADS")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher or GPU variables of the machine running the tests."""
    for name in GPU_ALLOCATION_VARIABLES + LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _mock_cuda(monkeypatch, available: bool, count: int = 0) -> list[int]:
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(int(index)))
    return chosen


# ------------------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("local_rank, visible, expected", [
    (0, 8, 0), (5, 8, 5),  # torchrun: one process per GPU of the node
    (3, 1, 0),  # --gpus-per-task / CUDA_VISIBLE_DEVICES with one entry: every task's GPU is its device 0
    (3, 2, 1),  # --gpus-per-task=2 under srun: each task uses one of its own two
])
def test_each_rank_takes_its_gpu_or_the_only_one_it_sees(clean_env, local_rank, visible, expected):
    chosen = _mock_cuda(clean_env, available=True, count=visible)
    clean_env.setenv("LOCAL_RANK", str(local_rank))
    context = DistributedContext.from_env("auto")
    assert chosen == [expected] and context.device == torch.device("cuda", expected)


def test_more_torchrun_processes_than_gpus_is_a_clear_error(clean_env):
    _mock_cuda(clean_env, available=True, count=4)
    clean_env.setenv("LOCAL_RANK", "5")
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    clean_env.setenv("TORCHELASTIC_RUN_ID", "job")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ValueError, match=r"torchrun started 8 processes .* see 4 CUDA device\(s\) .*"
                                         r"--nproc_per_node=4"):
        DistributedContext.from_env("cuda")
    assert cuda_device_index(5, 4, {}) == 1  # srun tasks each see their own devices: no error there


# ------------------------------------------------------------------------------------------ item 7
@pytest.mark.parametrize("variable, value", [
    ("SLURM_GPUS_ON_NODE", "4"), ("SLURM_JOB_GPUS", "0,1"), ("SLURM_STEP_GPUS", "2"),
    ("SLURM_GPUS_PER_NODE", "a100:8"), ("SLURM_GPUS_PER_TASK", "1"), ("CUDA_VISIBLE_DEVICES", "0"),
])
def test_auto_refuses_the_cpu_when_gpus_are_allocated_but_unusable(clean_env, variable, value):
    """The default torch wheel (CUDA 13) on a driver for CUDA 12: torch sees no GPU, and auto must not go on on
    the CPU. The message names the allocation, torch's CUDA build and the driver."""
    _mock_cuda(clean_env, available=False)
    clean_env.setenv(variable, value)
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setattr(distributed, "_nvidia_smi_driver", lambda: "535.104.05")
    clean_env.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12020, raising=False)
    with pytest.raises(RuntimeError) as raised:
        DistributedContext.from_env("auto")
    message = str(raised.value)
    assert f"trainer.device=auto: this job was given GPUs ({variable}={value})" in message
    assert f"torch {torch.__version__} is built for CUDA 13.0" in message
    assert "NVIDIA driver 535.104.05 (supports CUDA up to 12.2)" in message
    assert "trainer.device=cpu" in message and "\n" not in message


def test_the_driver_is_called_unknown_when_nothing_tells(clean_env):
    _mock_cuda(clean_env, available=False)
    clean_env.setenv("SLURM_JOB_GPUS", "0")
    clean_env.setattr(distributed, "_nvidia_smi_driver", lambda: None)
    clean_env.setattr(distributed.shutil, "which", lambda name: None)

    def no_driver():
        raise RuntimeError("no libcuda")

    clean_env.setattr(torch._C, "_cuda_getDriverVersion", no_driver, raising=False)
    with pytest.raises(RuntimeError, match=r"NVIDIA driver unknown \(torch cannot load it and nvidia-smi is not "
                                           r"on PATH\)"):
        DistributedContext.from_env("auto")


@pytest.mark.parametrize("environment", [
    {}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"},
    {"SLURM_GPUS_ON_NODE": "0"}, {"SLURM_GPUS_PER_NODE": "0"}, {"SLURM_GPUS_PER_NODE": "gpu:0"},
])
def test_auto_trains_on_the_cpu_when_no_gpu_was_allocated(clean_env, environment):
    _mock_cuda(clean_env, available=False)
    for name, value in environment.items():
        clean_env.setenv(name, value)
    assert gpus_allocated(os.environ) is None
    assert DistributedContext.from_env("auto").device == torch.device("cpu")


def test_gpu_counts_in_slurm_lists():
    assert gpus_allocated({"SLURM_GPUS_PER_NODE": "a100:0,v100:2"}) == "SLURM_GPUS_PER_NODE=a100:0,v100:2"
    assert gpus_allocated({"SLURM_GPUS_ON_NODE": "gpu:a100:8(IDX:0-7)"}) is not None
    assert gpus_allocated({"CUDA_VISIBLE_DEVICES": "GPU-5c1a7e2b"}) is not None  # UUIDs count too


def test_cpu_and_cuda_settings_are_checked(clean_env):
    _mock_cuda(clean_env, available=False)
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert DistributedContext.from_env("cpu").device == torch.device("cpu")  # cpu on purpose: no refusal
    with pytest.raises(ValueError, match="trainer.device=cuda but torch sees no usable CUDA device"):
        DistributedContext.from_env("cuda")
    with pytest.raises(ValueError, match="trainer.device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        DistributedContext.from_env("gpu")
    with pytest.raises(ValueError, match="distributed.timeout_minutes must be a number > 0, got 0"):
        DistributedContext.from_env("cpu", timeout_minutes=0)
    with pytest.raises(ValueError, match="distributed.threads_per_rank must be an integer >= 1 or null, got 0"):
        DistributedContext.from_env("cpu", threads_per_rank=0)


# ------------------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("environment, expected", [
    ({}, None),  # not launched by torchrun or SLURM: torch's own setting stays
    ({"TORCHELASTIC_RUN_ID": "j", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun's 1 replaced
    ({"TORCHELASTIC_RUN_ID": "j", "OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, None),  # the user's own value
    ({"TORCHELASTIC_RUN_ID": "j", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2", "SLURM_JOB_ID": "7",
      "SLURM_CPUS_PER_TASK": "8"}, 4),  # slurm/train.sbatch: one task per node, torchrun's ranks share its CPUs
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "6", "LOCAL_WORLD_SIZE": "2"}, 6),  # srun: a task per rank
    ({"SLURM_JOB_ID": "7", "LOCAL_WORLD_SIZE": "4"}, 4),  # no CPU count: the visible CPUs shared by the node's ranks
    ({"SLURM_JOB_ID": "7", "OMP_NUM_THREADS": "2"}, None),
    ({"TORCHELASTIC_RUN_ID": "j", "LOCAL_WORLD_SIZE": "32"}, 1),
])
def test_threads_per_rank(monkeypatch, environment, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_threads_per_rank(environment) == expected


def test_from_env_sets_the_threads_of_torch_and_faiss(clean_env):
    faiss = pytest.importorskip("faiss")
    previous = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        clean_env.setenv("TORCHELASTIC_RUN_ID", "job")
        clean_env.setenv("OMP_NUM_THREADS", "1")
        clean_env.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
        DistributedContext.from_env("cpu")
        assert torch.get_num_threads() == 3 and faiss.omp_get_max_threads() == 3
        DistributedContext.from_env("cpu", threads_per_rank=2)
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
    finally:
        torch.set_num_threads(previous[0])
        faiss.omp_set_num_threads(previous[1])


# ------------------------------------------------------------------------------------ host-side flags
def _host_flag_worker(rank: int, store_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        # The training device is "meta": a flag, barrier or gather that built a tensor there would fail.
        context = DistributedContext(rank, 2, rank, torch.device("meta"), host_group=dist.new_group(backend="gloo"))
        results = [context.any_true(rank == 1), context.any_true(False), context.gather_objects({"rank": rank})]
        context.barrier()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_flags_barriers_and_gathers_stay_on_the_host(tmp_path):
    """any_true, barrier and gather_objects use the host (gloo) group and CPU buffers, never the training device
    (on CUDA: no kernel, no device-to-host copy, no synchronisation per step)."""
    mp.spawn(_host_flag_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [True, False, [{"rank": 0}, {"rank": 1}]]


# --------------------------------------------------------------------------- torchrun's store, restarts
def _agree(store, rank, world, results, delay=0.0):
    time.sleep(delay)
    results[rank] = distributed._agree_on_token(store.clone(), rank, world, timedelta(seconds=60), poll_seconds=0.01)


@pytest.mark.parametrize("late_rank", [0, 1])
def test_a_restarted_group_agrees_on_a_namespace_no_earlier_group_used(late_rank):
    """torchrun's agent store still holds the previous group's keys when a restarted group starts: its token,
    joins and welcomes. Whichever rank comes first, all ranks agree on a new token, never the stale one."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    world = 3
    first: dict[int, str] = {}
    threads = [threading.Thread(target=_agree, args=(store, rank, world, first)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(first.values())) == 1  # the first start agrees
    stale = first[0]
    restarted: dict[int, str] = {}
    threads = [threading.Thread(target=_agree, args=(store, rank, world, restarted, 0.5 if rank == late_rank else 0))
               for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(restarted.values())) == 1 and restarted[0] != stale
