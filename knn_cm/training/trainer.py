"""One training loop for every objective: DDP, gradient accumulation, mixed precision, EMA, checkpoints, logs.

The loop is objective-agnostic: an objective (:mod:`knn_cm.training.objective`: iCT, EDM, flow matching or a
user's own) turns a batch of clean images into a loss; the trainer owns data order, optimisation, the EMA,
checkpoints (written atomically; ``resume="auto"`` continues bit for bit from the newest one in the run folder),
metrics (``metrics.jsonl``), sample grids and EMA network snapshots for evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from knn_cm.data import DataStore
from knn_cm.device import is_accelerator, new_generator
from knn_cm.models import resolve_amp_dtype, save_network
from knn_cm.models.dropout import shared_dropout
from knn_cm.runs.checkpoints import (
    checkpoint_path,
    load_checkpoint,
    load_latest_intact,
    newest_finite_checkpoint,
    refuse_restart_over_checkpoints,
    save_checkpoint,
)
from knn_cm.runs.jsonl import JsonLinesLog
from knn_cm.runs.layout import RunLayout
from knn_cm.training.config import TrainerConfig
from knn_cm.training.distributed import DistributedContext
from knn_cm.training.ema import EMA
from knn_cm.training.guard import NonFiniteFlag, NonFiniteLossError, all_finite
from knn_cm.training.loggers import NullLogger
from knn_cm.training.metrics import window_record
from knn_cm.training.objective import StepRandom
from knn_cm.training.outputs import save_image_grid
from knn_cm.training.preemption import PreemptionGuard
from knn_cm.training.state import splitmix64
from knn_cm.training.stream import BatchStream

log = logging.getLogger(__name__)

_CPU_STATE_BYTES = torch.Generator().get_state().numel()
_CUDA_STATE_BYTES = 16  # a CUDA (Philox) generator's state: its seed and offset


def generator_kind(state) -> str:
    """Which kind of generator saved ``state``, told by its size (checkpoints store states without devices)."""
    size = state.numel() if isinstance(state, torch.Tensor) else None
    if size == _CPU_STATE_BYTES:
        return "a CPU generator"
    if size == _CUDA_STATE_BYTES:
        return "a CUDA generator"
    return f"another device's generator ({size}-byte state)"


def restore_generator(generator: torch.Generator, state, seed: int) -> bool:
    """Set ``generator`` to ``state``; when ``state`` is another kind of generator's, seed it with ``seed``.

    True when the state was restored. A state is another kind's when it is no ByteTensor of the size of
    ``generator``'s own (a CPU generator's is thousands of bytes, a CUDA generator's 16), so ``set_state``
    would refuse it.
    """
    own = generator.get_state()
    if (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.device.type == "cpu"
            and state.numel() == own.numel()):
        generator.set_state(state)
        return True
    generator.manual_seed(seed)
    return False


class Trainer:
    """Trains ``denoiser`` with ``objective`` on ``store``; everything a run writes goes to ``run_dir``.

    Args:
        config: loop settings.
        run_dir: the run folder (stable across restarts, so ``resume="auto"`` finds its checkpoints).
        store: training data (with x-flip doubling when training uses x-flips).
        denoiser: the network (EDMPrecond / CMPrecond), on ``context.device``.
        objective: an :class:`~knn_cm.training.objective.Objective`: ``objective(net, x, step, random) ->
            (loss, stats)``, and ``samplers()`` giving name -> sampler(model, noise, generator) for grids.
        optimizer_factory: params -> torch optimizer (its lr is the base lr of the schedule).
        ema_factory: model -> :class:`EMA`.
        context: the distributed context (single process by default).
        logger: extra logger (wandb) on rank 0; metrics.jsonl is always written.
        run_metadata: stored in checkpoints and snapshots (e.g. the resolved config).
        estimator_device: device of the estimator's random generator.
        invocation: rank 0's wall-clock record (:class:`knn_cm.runs.binding.Invocation`), or None.
    """

    def __init__(self, config: TrainerConfig, run_dir: str | Path, store: DataStore, denoiser: nn.Module, objective,
                 optimizer_factory, ema_factory=EMA, context: DistributedContext | None = None, logger=None,
                 run_metadata: dict | None = None, estimator_device: torch.device | str = "cpu", invocation=None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.store = store
        self.context = context or DistributedContext.from_env(config.device)
        self.objective = objective
        self.logger = logger if (logger is not None and self.context.is_main) else NullLogger()
        self.layout = RunLayout(run_dir)
        self.metrics = JsonLinesLog(self.layout.metrics) if self.context.is_main else None
        self.run_metadata = run_metadata or {}
        self.invocation = invocation if self.context.is_main else None
        self.device = self.context.device
        if config.device != "auto" and self.device.type != config.device:
            raise ValueError(f"trainer.device={config.device} but the process's device is {self.device}: build the "
                             f"DistributedContext with the same device (DistributedContext.from_env(config.device))")

        world = self.context.world_size
        self.micro_batch = config.micro_batch_size or config.batch_size // world
        per_rank = config.batch_size // world
        if config.batch_size % world or per_rank % self.micro_batch:
            raise ValueError(f"batch_size {config.batch_size} must split into {world} ranks x whole micro-batches of "
                             f"{self.micro_batch}")
        self.accumulation = per_rank // self.micro_batch

        self.model = denoiser.to(self.device)
        self.model.amp_dtype = resolve_amp_dtype(None if config.precision == "fp32" else config.precision)
        self.ema = ema_factory(self.model)
        self.optimizer = optimizer_factory(self.model.parameters())
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and self.device.type == "cuda")
        self.student = self.model
        if self.context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

        self.stream = BatchStream(len(store), seed=config.seed)
        self.rank_seed = config.seed * 1_000_003 + self.context.rank
        # The objective's noise is drawn where it is used: a CUDA generator on a GPU (a CPU draw would be copied
        # to the device every step); the CPU generator everywhere else.
        noise_device = self.device if is_accelerator(self.device) else torch.device("cpu")
        self.noise_generator = new_generator(noise_device, self.rank_seed)
        self.estimator_generator = new_generator(estimator_device, self.rank_seed + 1)
        self.step = 0
        self.images_seen = 0
        self.start_step = 0  # the step this invocation started from (> 0 after a resume)
        self.resumed_from: Path | None = None  # the checkpoint this invocation loaded
        self._checkpointed_step = None  # the step of the newest checkpoint this invocation wrote or loaded
        # Non-finite losses and gradients are flagged on the device and read back only where the step's results
        # would be written or logged (a read every step would stall the GPU queue): [first bad step, loss bad].
        self._non_finite = NonFiniteFlag(self.device)
        self._resume()
        self.start_step = self.step

    # ------------------------------------------------------------------------------------- state
    def _generator_states(self) -> dict:
        states = {"noise": self.noise_generator.get_state(), "estimator": self.estimator_generator.get_state(),
                  "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _set_generator_states(self, states: dict) -> None:
        """Restore this rank's generators; a stream saved by another device's generator is reseeded instead.

        A run moved between a GPU and a CPU (to debug it, say) has generator states that the other kind of
        generator refuses; those streams restart from their initial seeds, as after a change of world size.
        """
        moved = []
        for name, generator, seed in (("noise", self.noise_generator, self.rank_seed),
                                      ("estimator", self.estimator_generator, self.rank_seed + 1)):
            if not restore_generator(generator, states[name], seed):
                moved.append(f"{name} (saved by {generator_kind(states[name])}, now on {generator.device})")
        if moved:
            log.warning("run %s: the checkpoint's random states were saved by another device's generators, so these "
                        "streams restart from their seeds: %s", self.run_dir, "; ".join(moved))
        torch.set_rng_state(states["torch_cpu"])
        if "torch_cuda" in states and self.device.type == "cuda":
            torch.cuda.set_rng_state(states["torch_cuda"], self.device)

    def state_dict(self) -> dict:
        """The full training state; generator states of every rank (collective: call on all ranks)."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "images_seen": self.images_seen,
                "generators": self.context.gather_objects(self._generator_states()),
                "world_size": self.context.world_size, "metadata": self.run_metadata}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        generators = state["generators"]
        if len(generators) == self.context.world_size:
            self._set_generator_states(generators[self.context.rank])
        else:  # a different number of ranks: the data order is kept, the random streams restart
            log.warning("checkpoint has %d ranks' random states, this run %d: reseeding the generators",
                        len(generators), self.context.world_size)

    def _resume(self) -> None:
        """Load the newest intact checkpoint (resume="auto") or the given one; refuse to start over a run.

        Checkpoints are read onto the CPU: generator states must stay CPU ByteTensors (a CUDA copy makes
        ``Generator.set_state`` raise), and ``load_state_dict`` moves every other tensor to where its module
        or optimizer lives.

        resume="never" on a folder that has checkpoints raises instead of training a new run whose checkpoints
        would interleave with (and prune) the old ones.
        """
        resume = self.config.resume
        refuse_restart_over_checkpoints(self.run_dir, resume)
        if resume == "never":
            return
        if resume == "auto":
            found = self._latest_intact()
            if found is None:  # killed before its first checkpoint: the records of that attempt are replayed too
                if self.context.is_main:
                    self.metrics.drop_after(0)
                return
            path, state = found
        else:
            path, state = Path(resume), load_checkpoint(resume, map_location="cpu")
        self.load_state_dict(state)
        self._checkpointed_step = self.step
        self.resumed_from = path
        self._record_invocation(start_step=self.step, resumed_from=str(path))
        if self.context.is_main:
            dropped = self.metrics.drop_after(self.step)
            log.info("resumed from %s (step %d, %d images seen)%s", path, self.step, self.images_seen,
                     f"; {dropped} metrics records after it will be logged again" if dropped else "")

    def _latest_intact(self) -> tuple[Path, dict] | None:
        """The newest intact checkpoint and its state, chosen by rank 0 alone (collective).

        Choosing can move a corrupt checkpoint aside; ranks choosing at once would race over that file. Rank 0
        chooses and broadcasts the path over the host group; the other ranks load that path.
        """
        found = self.context.on_main(lambda: load_latest_intact(self.run_dir, map_location="cpu"),
                                     refused=f"rank 0 could not choose a checkpoint of {self.run_dir} to resume from")
        chosen = self.context.broadcast_object(None if found is None else str(found[0]))
        if self.context.is_main or chosen is None:
            return found
        return Path(chosen), load_checkpoint(chosen, map_location="cpu")

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (collective); never writes non-finite weights."""
        path = checkpoint_path(self.run_dir, self.step)
        if self._checkpointed_step == self.step:
            return path
        self.raise_if_non_finite()
        self._raise_if_weights_not_finite()
        state = self.state_dict()  # collective
        if self.context.is_main:
            save_checkpoint(path, state, keep=self.config.keep_checkpoints)
        self.context.barrier()
        self._checkpointed_step = self.step
        return path

    def _raise_if_weights_not_finite(self) -> None:
        parameters = list(self.model.parameters()) + list(self.ema.model.parameters())
        if self.context.any_true(not all_finite(parameters)):
            self._raise_non_finite("non-finite weights")

    def raise_if_non_finite(self) -> None:
        """Raise when a step since the last check had a non-finite loss or gradients (collective; one host read)."""
        found = self._non_finite.read()
        if self.context.any_true(found is not None):
            if found is None:
                self._raise_non_finite("a non-finite loss or gradients on another rank", self.step)
            step, loss = found
            self._raise_non_finite(f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite gradients",
                                   step)

    def _raise_non_finite(self, what: str, step: int | None = None) -> None:
        step = self.step if step is None else step
        newest = newest_finite_checkpoint(self.run_dir) if self.context.is_main else None
        raise NonFiniteLossError(
            f"{what} at step {step} (now at step {self.step}, {self.images_seen} images seen); training stopped and "
            f"nothing since was written. The newest checkpoint with finite weights is "
            f"{newest or 'none (no checkpoint written yet)'}; resume from it (trainer.resume=PATH) with a lower "
            f"learning rate, gradient clipping (trainer.grad_clip) or fp32 precision.")

    # -------------------------------------------------------------------------------------- loop
    def learning_rate_factor(self, step: int, images_seen: int) -> float:
        """Schedule factor on the base lr: linear warm-up over warmup_images, then constant or cosine."""
        factor = min(images_seen / self.config.warmup_images, 1.0) if self.config.warmup_images > 0 else 1.0
        if self.config.lr_decay == "cosine" and self.config.max_steps > 0:
            progress = min(step / self.config.max_steps, 1.0)
            final = self.config.final_lr_fraction
            factor *= final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        return factor

    def _batch(self, micro_step: int) -> torch.Tensor:
        per_rank = self.micro_batch * self.accumulation
        start = self.images_seen + self.context.rank * per_rank + micro_step * self.micro_batch
        indices = self.stream.indices(start, self.micro_batch)
        batch = self.store.float(indices)
        if is_accelerator(self.device):  # a pageable copy would block the host until the GPU queue drains
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def dropout_seed(self, micro_step: int) -> int:
        """This rank's dropout seed for one micro-step: a hash of (seed, rank, step, micro-step).

        Every forward pass of a micro-step draws its dropout masks from generators seeded with it
        (:func:`knn_cm.models.dropout.shared_dropout`; iCT's student and teacher share them), so ranks drop
        different units, a rerun drops the same ones, and a resume needs no generator state for them.
        """
        return splitmix64(splitmix64(self.rank_seed) ^ (self.step * self.accumulation + micro_step)) >> 2

    def train_step(self) -> dict:
        """One optimizer step over ``batch_size`` images (all ranks, all micro-batches).

        No host synchronisation (fp16's grad scaler aside): the loss, statistics and gradient norm stay
        device tensors in the returned record, read back by :meth:`fit` only on the steps that log, and
        non-finite values are flagged on the device and checked before anything is logged or written.
        """
        factor = self.learning_rate_factor(self.step, self.images_seen)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        loss_sum, stats = None, {}
        for micro_step in range(self.accumulation):
            last = micro_step == self.accumulation - 1
            sync = contextlib.nullcontext() if (last or not self.context.distributed) else self.student.no_sync()
            random = StepRandom(self.noise_generator, self.estimator_generator, self.dropout_seed(micro_step))
            with sync, shared_dropout(random.seed):
                loss, stats = self.objective(self.student, self._batch(micro_step), self.step, random)
                self.scaler.scale(loss / self.accumulation).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        loss_mean = loss_sum / self.accumulation
        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in parameters]
        if self.config.nan_to_num_grads and grads:
            for grad in grads:
                torch.nan_to_num(grad, nan=0.0, posinf=1e5, neginf=-1e5, out=grad)
        # fp16's grad scaler skips steps with non-finite gradients by design; otherwise they would poison the weights
        self._non_finite.update(self.step, loss_mean, grads if not self.scaler.is_enabled() else [])
        grad_norm = None
        if self.config.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(parameters, self.config.grad_clip).detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ema_decay = self.ema.update(self.model, self.step, self.images_seen, self.config.batch_size)
        self.step += 1
        self.images_seen += self.config.batch_size
        record = {"loss": loss_mean, "lr": self.base_lrs[0] * factor, "ema_decay": ema_decay, **stats}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    def fit(self) -> dict:
        """Train until ``max_steps``, ``stop_after_steps`` more steps, or a preemption signal.

        Returns the last metrics record.
        """
        config = self.config
        bar = None
        if config.progress and self.context.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.max_steps, initial=self.step, unit="step", desc="training", dynamic_ncols=True)
        window: list[dict] = []
        window_start = time.perf_counter()
        record: dict = {}
        stop_at = config.max_steps
        if config.stop_after_steps is not None:
            stop_at = min(stop_at, self.step + config.stop_after_steps)
        preempted = False
        self._catch_up_outputs()
        start_step = self.step
        # The guard stays installed through the final checkpoint, so a late signal cannot cut it short.
        with PreemptionGuard(config.preemption_signals) as guard:
            try:
                while self.step < stop_at:
                    window.append(self.train_step())
                    if bar is not None:
                        bar.update(1)
                    if self.step % config.log_every == 0 or self.step == config.max_steps:
                        seconds = time.perf_counter() - window_start
                        record = self._log_window(window, seconds)
                        window, window_start = [], time.perf_counter()
                        if bar is not None:  # the loss is read at log steps only (a read waits for the GPU)
                            bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}")
                    self._periodic_outputs()
                    # Every rank stops at the same step when any rank was signalled.
                    if guard.signals and self.context.any_true(guard.received is not None):
                        preempted = True
                        if window:
                            record = self._log_window(window, time.perf_counter() - window_start)
                        break
            finally:
                if bar is not None:
                    bar.close()
            self.raise_if_non_finite()
            if self.step >= config.max_steps > start_step:  # finished now, not merely stopped or already done
                self.save_snapshot()
                self.save_samples()
            self.save_checkpoint()  # last: a checkpoint counts only once everything due at its step is written
            self._record_invocation(finished=self.step >= config.max_steps)
            self.logger.close()
        if preempted:
            if self.context.is_main:
                log.warning("stopped by %s at step %d (%d images seen); checkpoint %s; the same command with "
                            "trainer.resume=auto continues", guard.received_name, self.step, self.images_seen,
                            checkpoint_path(self.run_dir, self.step))
            elif self.context.distributed:  # each rank says what it received (SLURM signals every task)
                log.info("rank %d stopped by %s at step %d", self.context.rank, guard.received_name, self.step)
            if guard.received is not None:
                guard.hand_over()
        return record

    def _periodic_outputs(self) -> None:
        """EMA snapshot, sample grid and checkpoint when their intervals come round (the end has its own).

        The checkpoint comes last: a kill before it replays the step from the previous checkpoint, which writes
        the same snapshot and grids again, so nothing due at a checkpointed step is ever missing.
        """
        config, step = self.config, self.step
        if step >= config.max_steps:
            return
        due = [config.snapshot_every and step % config.snapshot_every == 0,
               config.sample_every and step % config.sample_every == 0, step % config.checkpoint_every == 0]
        if any(due):  # nothing is written from weights that a non-finite step has touched
            self.raise_if_non_finite()
        if config.snapshot_every and step % config.snapshot_every == 0:
            self.save_snapshot()
        if config.sample_every and step % config.sample_every == 0:
            self.save_samples()
        if step % config.checkpoint_every == 0:
            self.save_checkpoint()

    def _catch_up_outputs(self) -> None:
        """Write the snapshot and grids due at the resumed step when they are missing (checkpoints of older
        versions were written before their snapshot; a copy may have been deleted by hand)."""
        config, step = self.config, self.step
        if step == 0 or not self.context.is_main:
            return
        finished = step >= config.max_steps
        if (finished or (config.snapshot_every and step % config.snapshot_every == 0)) and \
                not self.snapshot_path(step).exists():
            log.warning("snapshot due at step %d is missing: writing it now", step)
            self.save_snapshot()
        names = list(self.objective.samplers()) if config.num_sample_images >= 1 else []
        if (finished or (config.sample_every and step % config.sample_every == 0)) and \
                any(not self.sample_path(name, step).exists() for name in names):
            log.warning("sample grids due at step %d are missing: writing them now", step)
            self.save_samples()

    def _record_invocation(self, **values) -> None:
        if self.invocation is not None:
            self.invocation.update(step=self.step, images_seen=self.images_seen, **values)

    def _log_window(self, window: list[dict], seconds: float) -> dict:
        """Average the window's step records (device tensors read back here, in one go) and log them."""
        if not window:
            return {}
        self.raise_if_non_finite()  # a non-finite loss is never logged as a number
        record = window_record(window, seconds, self.config.batch_size, self.step, self.images_seen)
        if self.metrics is not None:
            self.metrics.log(record)
            self.logger.log(record)
        self._record_invocation()
        return record

    # --------------------------------------------------------------------------------- outputs
    def snapshot_path(self, step: int) -> Path:
        return self.layout.snapshot(step)

    def sample_path(self, name: str, step: int) -> Path:
        return self.layout.sample_grid(name, step)

    def save_snapshot(self) -> Path | None:
        """The EMA network as a network file (``snapshots/network-<step>.pt``) for sampling / evaluation."""
        if not self.context.is_main:
            return None
        if not all_finite(list(self.ema.model.parameters())):
            self._raise_non_finite("non-finite EMA weights")
        path = self.snapshot_path(self.step)
        metadata = {"step": self.step, "images_seen": self.images_seen, **self.run_metadata}
        return save_network(path, self.ema.model, metadata=metadata)

    @torch.no_grad()
    def save_samples(self) -> list[Path]:
        """Sample grids from the EMA network (sample i uses seed i), one PNG per sampler of the objective."""
        if not self.context.is_main or self.config.num_sample_images < 1:
            return []
        from knn_cm.sampling import noise_for_seeds

        noise = noise_for_seeds(range(self.config.num_sample_images), self.store.shape, self.device)
        paths = []
        for name, sampler in self.objective.samplers().items():
            images = sampler(self.ema.model, noise, torch.Generator(device=self.device).manual_seed(0))
            path = self.sample_path(name, self.step)
            save_image_grid(images, path)
            self.logger.log_image(f"samples/{name}", path, self.step)
            paths.append(path)
        return paths


