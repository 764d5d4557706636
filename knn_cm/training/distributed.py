"""Process-group plumbing for multi-GPU (and multi-process CPU) training launched by ``torchrun``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """This process's place in the job: rank, world size and device.

    Built by :meth:`from_env` from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process otherwise.
    The backend is NCCL on CUDA and gloo on CPU (CPU DDP runs the same code path in tests).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistributedContext":
        """Join torchrun's process group (when WORLD_SIZE > 1) and pick the device.

        device: "auto" (CUDA when available, else CPU), "cpu", or "cuda".
        """
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        _export_submitit_environment()
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but CUDA is not available; use trainer.device=cpu")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
            chosen = torch.device("cuda", local_rank)
        else:
            chosen = torch.device("cpu")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if world_size > 1:
            log.info("rank %d of %d (local rank %d), master %s:%s, device %s", rank, world_size, local_rank,
                     os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), chosen)
        return cls(rank, world_size, local_rank, chosen)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_objects(self, obj) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _export_submitit_environment() -> None:
    """Inside a multi-task SLURM job step without torchrun's variables, export them from the SLURM job.

    A step of several tasks is a submitit job (SUBMITIT_FOLDER, SLURM_NTASKS > 1: submitit's
    TorchDistributedEnvironment) or plain ``srun`` (SLURM_STEP_NUM_TASKS > 1, e.g. ``sbatch --ntasks-per-node=2``
    with ``srun python train.py``: the step's tasks, master on the job's first node, MASTER_PORT or
    20000 + job id % 20000 as in slurm/train.sbatch). A batch script is no step: there ``python train.py``
    stays a single process.
    """
    if "WORLD_SIZE" in os.environ:
        return
    if "SUBMITIT_FOLDER" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    elif int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        tasks, nodes = int(os.environ["SLURM_STEP_NUM_TASKS"]), int(os.environ.get("SLURM_STEP_NUM_NODES", "1"))
        os.environ.update({"MASTER_ADDR": job.hostnames[0], "RANK": str(job.global_rank), "WORLD_SIZE": str(tasks),
                           "LOCAL_RANK": str(job.local_rank), "LOCAL_WORLD_SIZE": str(tasks // nodes),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(20000 + int(job.raw_job_id) % 20000))})
