"""Process-group plumbing for multi-GPU (and multi-process CPU) training launched by ``torchrun`` or ``srun``.

- **Device.** ``trainer.device=auto`` trains on CUDA when torch can use it. When the job says GPUs are allocated
  (SLURM's GPU variables, ``CUDA_VISIBLE_DEVICES``) but torch sees none (typically a torch build for a newer CUDA
  than the node's driver), it fails with torch's CUDA version and the driver instead of training on the CPU
  (:func:`knn_cm.device.auto_uses_cuda`, the same check as every other ``device=auto``).
  Each rank takes GPU ``LOCAL_RANK`` of those it sees, or GPU 0 when it sees one (``--gpus-per-task``).
- **Process group.** NCCL on CUDA, gloo on CPU, with a timeout (``distributed.timeout_minutes``): a collective
  that waits longer for a hung or stopped rank fails, and the job ends instead of holding its allocation.
  Flags, barriers and object gathers run on a gloo group (host memory), so on CUDA they never read a device
  tensor back. Under torchrun's agent store every start (first or restarted) uses its own key namespace.
- **Gloo across nodes.** The host group (and CPU training) is gloo, a TCP mesh between all ranks; each rank
  offers the address its hostname resolves to. Where that is a loopback address (``127.0.1.1`` in many
  ``/etc/hosts``), ranks of other nodes cannot connect: without ``GLOO_SOCKET_IFNAME`` such a rank sets it to the
  interface that reaches ``MASTER_ADDR``, and says so (or warns when it finds none).
- **Threads.** Under torchrun or SLURM each rank gets its share of the task's CPUs (torchrun sets
  ``OMP_NUM_THREADS=1``, which would leave faiss index builds and CPU searches on one core).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import shutil  # noqa: F401  (existing callers reach shutil.which through this module)
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

# The GPU-allocation check is knn_cm.device's (one for every device=auto); its names stay importable from here.
from knn_cm.device import GPU_ALLOCATION_VARIABLES, auto_uses_cuda, cuda_versions, gpus_allocated  # noqa: F401
from knn_cm.device import nvidia_smi_driver as _nvidia_smi_driver

log = logging.getLogger(__name__)

# NCCL's default is 10 minutes (gloo's 30). Ranks reach the first collective after building or loading the KNN
# index, and a node that builds an IVF index at ImageNet-64 scale (k-means over 1.28M x 12,288) while another
# node loads it from its cache can be tens of minutes apart; an hour covers that with room. It is also how
# long a hung rank (stopped, deadlocked, lost node) holds the job before every rank fails: shorten it where
# indexes are cached or small (configs/train/train.yaml: distributed.timeout_minutes).
DEFAULT_TIMEOUT_MINUTES = 60.0

_ROUND_KEY = "knn_cm/round"  # the agent-store key naming the newest start's namespace


class RankRefusal(RuntimeError):
    """Raised on the other ranks when rank 0's part of a collective decision failed (rank 0 raises its own error)."""


@dataclass
class DistributedContext:
    """This process's place in the job: rank, world size and device.

    Built by :meth:`from_env` from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process otherwise.
    The backend is NCCL on CUDA and gloo on CPU (CPU DDP runs the same code path in tests).

    Attributes:
        host_group: the gloo process group of :meth:`any_true`, :meth:`barrier`, :meth:`gather_objects` and
            :meth:`broadcast_object` when the main backend is NCCL (None: the default group, already gloo, or a
            single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    host_group: object = None

    @classmethod
    def from_env(cls, device: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                 threads_per_rank: int | None = None) -> DistributedContext:
        """Join the process group (when WORLD_SIZE > 1), pick the device and the CPU threads.

        Args:
            device: "auto" (CUDA when available, else CPU; an error when GPUs are allocated but unusable),
                "cpu", or "cuda".
            timeout_minutes: how long a collective waits for the other ranks (see ``DEFAULT_TIMEOUT_MINUTES``).
            threads_per_rank: CPU threads of this rank (None: :func:`default_threads_per_rank`).
        """
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if isinstance(timeout_minutes, bool) or not isinstance(timeout_minutes, (int, float)) or timeout_minutes <= 0:
            raise ValueError(f"distributed.timeout_minutes must be a number > 0, got {timeout_minutes!r}")
        if threads_per_rank is not None and (isinstance(threads_per_rank, bool) or not isinstance(threads_per_rank, int)
                                             or threads_per_rank < 1):
            raise ValueError(f"distributed.threads_per_rank must be an integer >= 1 or null, got {threads_per_rank!r}")
        _export_submitit_environment()
        use_cuda = _use_cuda(device, os.environ)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        threads = threads_per_rank or default_threads_per_rank(os.environ)
        if threads is not None:
            set_cpu_threads(threads)
        if use_cuda:
            index = cuda_device_index(local_rank, torch.cuda.device_count(), os.environ)
            torch.cuda.set_device(index)
            chosen = torch.device("cuda", index)
        else:
            chosen = torch.device("cpu")
        host_group = None
        if world_size > 1 and not dist.is_initialized():
            choose_gloo_interface(os.environ)
            timeout = timedelta(minutes=timeout_minutes)
            backend = "nccl" if use_cuda else "gloo"
            store = _restart_safe_store(rank, world_size, timeout)
            if store is None:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank,
                                        world_size=world_size)
            if backend != "gloo":
                host_group = dist.new_group(backend="gloo", timeout=timeout)
        if world_size > 1:
            log.info("rank %d of %d (local rank %d), master %s:%s, device %s, %d CPU threads, timeout %g min",
                     rank, world_size, local_rank, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"),
                     chosen, torch.get_num_threads(), timeout_minutes)
        return cls(rank, world_size, local_rank, chosen, host_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.host_group)

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank.

        A host collective (gloo on a CPU tensor over a NumPy buffer, read back as NumPy): on CUDA it neither
        launches a kernel nor waits for the GPU.
        """
        if not self.distributed:
            return flag
        buffer = np.array([1 if flag else 0], dtype=np.int32)
        dist.all_reduce(torch.from_numpy(buffer), op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(buffer[0] > 0)

    def gather_objects(self, obj) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank (a host collective: pickled over the gloo group)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.host_group)
        return box[0]

    def on_main(self, action, refused: str = "rank 0 refused"):
        """``action()`` on rank 0 only; its result there (None on the other ranks). When it raises, every rank
        raises: rank 0 its own error, the others a :class:`RankRefusal` saying ``refused`` and rank 0's error
        (collective)."""
        result, failure = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as error:  # the other ranks wait for the verdict: give it before raising
                failure = error
        verdict = self.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if verdict is not None:
            raise RankRefusal(f"{refused} ({verdict})")
        return result

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- device
def _use_cuda(device: str, environ) -> bool:
    """Whether this rank trains on CUDA; a clear error when the setting cannot be honoured."""
    if device == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device=cuda but torch sees no usable CUDA device "
                         f"({cuda_versions(_nvidia_smi_driver)}); use trainer.device=cpu to train on the CPU")
    return auto_uses_cuda("trainer.device", environ, driver=_nvidia_smi_driver)


def cuda_device_index(local_rank: int, device_count: int, environ=None) -> int:
    """The CUDA device of the rank with ``local_rank`` among the ``device_count`` devices it sees.

    One device per rank as torchrun starts them (``LOCAL_RANK`` indexes the node's GPUs), and device 0 where
    each task sees only its own GPU (``--gpus-per-task``, CUDA_VISIBLE_DEVICES with one entry): in general
    ``local_rank % device_count``. Under torchrun all local ranks see the same devices, so more ranks than
    devices would put two ranks on one GPU (NCCL refuses): an error naming both counts.
    """
    environ = os.environ if environ is None else environ
    if device_count < 1:
        raise RuntimeError("CUDA is available but torch counts no CUDA device")
    local_ranks = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" in environ and local_ranks > device_count:
        raise ValueError(f"torchrun started {local_ranks} processes on this node but they see {device_count} CUDA "
                         f"device(s) (CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '(not set)')}): "
                         f"start one process per GPU (--nproc_per_node={device_count})")
    return local_rank % device_count


# ------------------------------------------------------------------------------------------ gloo interface
def choose_gloo_interface(environ, resolve=None, interface_towards=None) -> str | None:
    """On a multi-node job whose hostname resolves to loopback, set ``GLOO_SOCKET_IFNAME`` in ``environ``.

    gloo listens on, and tells its peers, the address this host's name resolves to; a loopback address there
    makes start-up fail on every other node. Nothing changes on one node (``LOCAL_WORLD_SIZE`` equal to
    ``WORLD_SIZE``, or ``MASTER_ADDR`` on loopback), when ``GLOO_SOCKET_IFNAME`` is set, or when the hostname
    resolves elsewhere. Returns the interface set, or None.

    Args:
        resolve: host name -> IP address or None (default: :func:`socket.gethostbyname`).
        interface_towards: IP address -> name of the local interface that reaches it, or None.
    """
    resolve = resolve or _resolve
    interface_towards = interface_towards or _interface_towards
    world = int(environ.get("WORLD_SIZE", "1"))
    if environ.get("GLOO_SOCKET_IFNAME") or int(environ.get("LOCAL_WORLD_SIZE", str(world))) >= world:
        return None
    hostname = socket.gethostname()
    own, master = resolve(hostname), resolve(environ.get("MASTER_ADDR", ""))
    if own is None or not ipaddress.ip_address(own).is_loopback:
        return None
    if master is None or ipaddress.ip_address(master).is_loopback:
        return None  # every rank is on this host: loopback reaches them all
    interface = interface_towards(master)
    if interface is None:
        log.warning("this host's name %s resolves to %s (loopback), so ranks on other nodes cannot reach gloo here "
                    "and start-up will fail; set GLOO_SOCKET_IFNAME to the network interface that reaches "
                    "MASTER_ADDR=%s (docs/slurm.md)", hostname, own, environ.get("MASTER_ADDR"))
        return None
    environ["GLOO_SOCKET_IFNAME"] = interface
    log.warning("this host's name %s resolves to %s (loopback), which ranks on other nodes cannot reach: set "
                "GLOO_SOCKET_IFNAME=%s, the interface that reaches MASTER_ADDR=%s (set it yourself to choose "
                "another)", hostname, own, interface, environ.get("MASTER_ADDR"))
    return interface


def _resolve(name: str) -> str | None:
    if not name:
        return None
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def _interface_towards(address: str) -> str | None:
    """The local interface whose IPv4 address this host uses to reach ``address`` (Linux), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))  # a UDP connect sends nothing: it only picks the route
            local = probe.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:
                    request = struct.pack("256s", name[:15].encode())
                    reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR: the interface's address
                except OSError:
                    continue
                if socket.inet_ntoa(reply[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------- threads
def default_threads_per_rank(environ) -> int | None:
    """CPU threads for this rank under torchrun or SLURM, or None to leave torch's setting alone.

    The task's CPUs (``SLURM_CPUS_PER_TASK``, else the CPUs this process may run on) divided by the ranks that
    share them: the local ranks torchrun started in one task, or every local rank when SLURM gave no CPU count.
    ``OMP_NUM_THREADS`` set by the user is kept; torchrun's default of 1 is not (it would leave faiss builds and
    CPU searches on one core). Outside torchrun and SLURM nothing changes.
    """
    torchrun = "TORCHELASTIC_RUN_ID" in environ
    if not torchrun and "SLURM_JOB_ID" not in environ:
        return None
    omp = environ.get("OMP_NUM_THREADS")
    if omp and not (torchrun and omp == "1"):
        return None
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    slurm_cpus = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm_cpus.isdigit() and int(slurm_cpus) > 0:
        cpus, sharing = min(int(slurm_cpus), visible), (local_ranks if torchrun else 1)
    else:
        cpus, sharing = visible, local_ranks
    return max(1, cpus // sharing)


def set_cpu_threads(threads: int) -> None:
    """torch's intra-op threads and faiss's OpenMP threads (faiss has its own runtime, set from OMP_NUM_THREADS
    when it was loaded: index builds and CPU searches would keep torchrun's 1)."""
    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:  # faiss is optional (the torch index needs none)
        return
    faiss.omp_set_num_threads(threads)


# --------------------------------------------------------------------------------------- process group
def _restart_safe_store(rank: int, world_size: int, timeout: timedelta):
    """Under torchrun's agent store: a key namespace of this start alone, else None (``env://`` as usual).

    torchrun (c10d rendezvous) keeps one TCPStore for the whole job and hands it to every round of workers,
    and gloo publishes each rank's listening address under fixed keys (``default_pg/0//cpu//0/<rank>``). After a
    worker is killed and the group restarted, a new rank that reaches ``init_process_group`` before its peer
    has overwritten that key reads the dead process's address: ``Gloo connectFullMesh failed ... Connection
    refused``, or both ranks wait for each other to connect (a hang that outlasted a 2-minute timeout here).
    Restart counters cannot name the round (each node's agent keeps its own, pytorch/pytorch#135712), so rank 0
    publishes a fresh token and every other rank proves it read this start's token: it answers with a nonce of
    its own, and only the new rank 0, waiting under the fresh token, echoes it back. A stale token is never
    confirmed; its reader re-reads the token until rank 0 of this start has written it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timeout)
    token = _agree_on_token(base, rank, world_size, timeout)
    return dist.PrefixStore(f"knn_cm/{token}/", base)


def _agree_on_token(store, rank: int, world_size: int, timeout: timedelta, poll_seconds: float = 0.05) -> str:
    """A token that every rank of this start returns and no earlier start used (see :func:`_restart_safe_store`)."""
    if rank == 0:
        token = uuid.uuid4().hex
        store.set(_ROUND_KEY, token)
        joins = [f"knn_cm/{token}/join/{peer}" for peer in range(1, world_size)]
        store.wait(joins, timeout)  # only this start's ranks write under a fresh token
        for peer, key in enumerate(joins, start=1):
            store.set(f"knn_cm/{token}/welcome/{peer}", store.get(key))
        return token
    nonce = uuid.uuid4().hex.encode()
    deadline = time.monotonic() + timeout.total_seconds()
    token = None
    while time.monotonic() < deadline:
        current = store.get(_ROUND_KEY).decode()  # waits for the first start's rank 0
        if current != token:  # a new token (the first, or rank 0 of this start replacing an old one): join it
            token = current
            store.set(f"knn_cm/{token}/join/{rank}", nonce)
        welcome = f"knn_cm/{token}/welcome/{rank}"
        if store.check([welcome]) and store.get(welcome) == nonce:
            return token
        time.sleep(poll_seconds)
    raise RuntimeError(f"rank {rank}: rank 0 of this start did not confirm the process group's key namespace "
                       f"within {timeout} (distributed.timeout_minutes); last token read: {token}")


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
