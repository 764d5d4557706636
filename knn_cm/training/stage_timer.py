"""Wall time of one stage of a training step (the estimator's targets), right on every device.

On CUDA, work is queued asynchronously: ``perf_counter`` around a stage times only its kernel launches
(the estimator's share would read near zero). So on CUDA a pair of events is recorded on the stream
around the stage, and their elapsed time is read by ``float()`` once the step has read its loss (that
read already waited for the stream, so the events are complete and reading them waits for nothing).
Recording events does not synchronise with the host.
"""

from __future__ import annotations

import time

import torch


class StageTimer:
    """``with StageTimer(device) as timer: ...`` then ``float(timer)``: the stage's seconds."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._seconds: float | None = None

    def __enter__(self) -> StageTimer:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._started

    def __float__(self) -> float:
        if self._seconds is None:
            if not self.cuda:
                raise RuntimeError("StageTimer read before its stage ended")
            self._end.synchronize()  # complete already when the step's loss has been read
            self._seconds = self._start.elapsed_time(self._end) / 1e3
        return self._seconds


def resolve_timers(stats: dict) -> dict:
    """``stats`` with every :class:`StageTimer` value read as seconds (call after the loss is read)."""
    return {key: float(value) if isinstance(value, StageTimer) else value for key, value in stats.items()}
