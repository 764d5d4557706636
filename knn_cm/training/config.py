"""The training loop's settings (``configs/train/trainer/*.yaml``, under ``trainer``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from knn_cm.training.preemption import parse_signal

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAYS = ("constant", "cosine")


@dataclass
class TrainerConfig:
    """Settings of the training loop (``configs/train/trainer/*.yaml`` holds them under ``trainer``).

    Registered in Hydra's ConfigStore as ``trainer/schema`` (hydra_plugins/knn_cm_schemas), so OmegaConf checks
    each setting's type while the config is composed; the ranges are checked here.
    """

    max_steps: int = 400_000  # optimizer steps K; the iCT curriculum and lr schedule span them
    stop_after_steps: int | None = None  # end this invocation after so many steps (checkpointed), e.g. to fit
    #                                      a job's time limit; resume=auto continues the same schedule
    batch_size: int = 1024  # global batch: all ranks and all accumulation micro-steps together
    micro_batch_size: int | None = None  # per-rank micro-batch (None: batch_size / world size, no accumulation)
    warmup_images: int = 0  # linear learning-rate warm-up over this many images (EDM: 10M)
    lr_decay: str = "constant"  # "constant" or "cosine" (down to final_lr_fraction at max_steps)
    final_lr_fraction: float = 0.0  # with cosine decay: the last step's lr / base lr
    grad_clip: float | None = None  # clip the global gradient norm to this value (None: no clipping)
    nan_to_num_grads: bool = False  # EDM: replace non-finite gradient entries (nan -> 0, inf -> +-1e5)
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" autocast of the network (CUDA; fp16 uses a grad scaler)
    checkpoint_every: int = 1000  # steps between training checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest training checkpoints kept (snapshots are all kept)
    snapshot_every: int | None = None  # steps between EMA network snapshots for evaluation (None: end only)
    sample_every: int | None = None  # steps between sample grids (None: end only)
    num_sample_images: int = 64  # images per sample grid (sample i uses seed i)
    log_every: int = 50  # steps between metrics records
    resume: str = "auto"  # "auto": continue from the newest checkpoint of the run folder; "never"; or a path
    seed: int = 0  # data order, noise, dropout and estimator draws derive from it
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    progress: bool = True  # progress bar with images/s and ETA (rank 0)
    # Signals that stop training gracefully: the running step finishes, a checkpoint is written, then the
    # signal's previous handler runs (submitit's requeue) or the process exits with 128 + signal number.
    # SLURM's --signal, submitit (SIGUSR2) and scontrol requeue / torchrun shutdown (SIGTERM). [] disables.
    preemption_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"trainer.max_steps must be >= 0, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"trainer.batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown lr_decay {self.lr_decay!r}; allowed: {', '.join(LR_DECAYS)}")
        for name in self.preemption_signals:
            parse_signal(name)  # a clear error now rather than when training starts
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_after_steps is not None and self.stop_after_steps < 0:
            raise ValueError(f"trainer.stop_after_steps must be >= 0 or null, got {self.stop_after_steps}")
        for name in ("micro_batch_size", "snapshot_every", "sample_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1 or null, got {getattr(self, name)}")


def trainer_config(values: dict) -> TrainerConfig:
    """A TrainerConfig from a mapping that may hold other keys too (objective, optimizer, ema)."""
    names = {field.name for field in dataclasses.fields(TrainerConfig)}
    return TrainerConfig(**{key: value for key, value in values.items() if key in names})
