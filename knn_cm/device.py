"""Device parsing shared by indexes, estimators, the trainer and the apps.

``auto`` means one thing everywhere: CUDA when torch can use it, else the CPU; but when the job says GPUs are
allocated (SLURM's GPU variables, ``CUDA_VISIBLE_DEVICES``) and torch sees none (typically a torch build for a
newer CUDA than the node's driver), an error naming torch's CUDA version and the driver instead of a silent
CPU run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import torch

# Variables through which SLURM (and CUDA's own convention) say that this process was given GPUs.
GPU_ALLOCATION_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE",
                            "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")


class UnusableGPUsError(ValueError, RuntimeError):
    """``auto`` on a process that was given GPUs which torch cannot use: a setting this machine cannot honour."""


def as_device(device, what: str = "device") -> torch.device:
    """``device`` as a torch.device; a ValueError naming it unless it is cpu, an available CUDA device or meta.

    ``"auto"`` picks CUDA when available, else the CPU. ``meta`` (shapes without values) stands in for an
    accelerator where there is none: the host-sync counter (:mod:`knn_cm.host_syncs`) runs GPU code paths on it.
    """
    if device == "auto":
        return concrete_device("cuda" if auto_uses_cuda(what) else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what} must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from error
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{what} must be 'auto', 'cpu' or 'cuda[:i]', got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device} requested but CUDA is not available; use 'cpu'")
    return concrete_device(device)


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with a bare "cuda" made the current CUDA device, "cuda:N"; any other device as it is.

    The current device is the one ``torch.cuda.set_device`` chose for this process (the trainer sets each
    rank's): so "cuda" means this rank's GPU wherever a device number is needed (faiss-gpu), and "cuda" and
    "cuda:N" name one cache entry (a store's resident rows).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def is_accelerator(device: torch.device | str) -> bool:
    """True where work is queued for a device (CUDA, and meta standing in for it): host reads wait there."""
    return torch.device(device).type != "cpu"


class _MetaGenerator(torch.Generator):
    """A CPU generator that reports the meta device: random operations on meta draw nothing, only shapes."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


def new_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (on meta: one that meta random operations accept)."""
    device = torch.device(device)
    generator = _MetaGenerator() if device.type == "meta" else torch.Generator(device=device)
    return generator.manual_seed(seed)


def to_device_async(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) copied to ``device`` without making the host wait: from pinned memory on CUDA
    (a copy from pageable memory first waits for the device's queue to drain), non-blocking everywhere."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One seed in [0, 2**62) drawn from ``generator`` on its own device (default: the global CPU generator).

    A CUDA generator's draw is read back: one host synchronisation, for callers outside a training step.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def host_generator(generator: torch.Generator | None, seed: int | None = None) -> torch.Generator | None:
    """A CPU generator for draws made on the host: ``generator`` itself when it is a CPU generator (or None);
    else one seeded with ``seed``, or, without a seed, with a draw from ``generator`` (:func:`draw_seed`)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(draw_seed(generator) if seed is None else seed)


# ------------------------------------------------------------------------------------- "auto" and GPUs
def auto_uses_cuda(what: str = "device", environ=None,
                   driver: Callable[[], str | None] | None = None) -> bool:
    """Whether ``what=auto`` runs on CUDA: True when torch can use it, False when no GPU was allocated.

    Raises :class:`UnusableGPUsError` when the job was given GPUs (:func:`gpus_allocated`) but torch sees none,
    naming the allocation, torch's CUDA build and the driver (``driver``: how to read its version, default
    nvidia-smi).
    """
    if torch.cuda.is_available():
        return True
    allocated = gpus_allocated(os.environ if environ is None else environ)
    if allocated:
        raise UnusableGPUsError(
            f"{what}=auto: this job was given GPUs ({allocated}) but torch sees no usable CUDA device, so it "
            f"would run on the CPU. {cuda_versions(driver)}. Install a torch build for the driver's CUDA version "
            f"(or update the driver), or set {what}=cpu to run on the CPU on purpose")
    return False


def gpus_allocated(environ) -> str | None:
    """``NAME=value`` of the first variable saying that GPUs were allocated to this process, else None.

    CUDA_VISIBLE_DEVICES counts when it lists devices (not "", "-1" or SLURM's "NoDevFiles"); SLURM's lists
    (SLURM_JOB_GPUS, SLURM_STEP_GPUS) when non-empty; its counts ("8", "a100:8", "a100:4,v100:2") when above 0.
    """
    for name in GPU_ALLOCATION_VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            continue
        if name == "CUDA_VISIBLE_DEVICES":
            if value not in ("-1", "NoDevFiles") and not value.startswith("-1,"):
                return f"{name}={value}"
        elif name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
            return f"{name}={value}"
        elif any(_count(part) > 0 for part in value.split(",")):
            return f"{name}={value}"
    return None


def _count(part: str) -> int:
    """The GPU count of one entry of a SLURM count list: "8", "a100:8", "gpu:a100:8(IDX:0-7)" -> 8."""
    field = part.split("(")[0].rsplit(":", 1)[-1]
    return int(field) if field.isdigit() else 0


def cuda_versions(driver: Callable[[], str | None] | None = None) -> str:
    """What torch and the system say about CUDA: torch's build, the driver (``unknown`` when nothing tells).

    ``driver`` reads the driver's version (default :func:`nvidia_smi_driver`).
    """
    build = torch.version.cuda
    parts = [f"torch {torch.__version__} is built for CUDA {build}" if build else
             f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"]
    version_text = (driver or nvidia_smi_driver)()
    supported = None
    try:
        version = int(torch._C._cuda_getDriverVersion())  # the CUDA version the driver supports, e.g. 12020
        supported = f"{version // 1000}.{version % 1000 // 10}" if version > 0 else None
    except (AttributeError, RuntimeError):
        pass
    if version_text or supported:
        parts.append("NVIDIA driver " + (version_text or "version unknown")
                     + (f" (supports CUDA up to {supported})" if supported else ""))
    else:
        parts.append("NVIDIA driver unknown (torch cannot load it and nvidia-smi is "
                     + ("not on PATH)" if shutil.which("nvidia-smi") is None else "not answering)"))
    return "; ".join(parts)


def nvidia_smi_driver() -> str | None:
    """The NVIDIA driver version(s) nvidia-smi reports, or None when it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})
    return ", ".join(versions) if result.returncode == 0 and versions else None
