"""StageTimer: a stage's wall time on the CPU; on CUDA, event-timed without a host synchronisation."""

from __future__ import annotations

import time

import pytest
import torch

from knn_cm.training.stage_timer import StageTimer, resolve_timers


def test_cpu_stage_time_is_the_stage_wall_time():
    with StageTimer("cpu") as timer:
        time.sleep(0.05)
    time.sleep(0.05)  # after the stage: not counted
    assert 0.05 <= float(timer) < 0.095
    stats = resolve_timers({"estimator_seconds": timer, "distance": 0.5})
    assert stats == {"estimator_seconds": float(timer), "distance": 0.5}


def test_reading_before_the_stage_ends_is_an_error():
    timer = StageTimer("cpu").__enter__()
    with pytest.raises(RuntimeError, match="before its stage ended"):
        float(timer)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (run `make device-check` on a GPU machine)")
def test_cuda_stage_time_counts_the_queued_work_and_never_synchronises():
    a = torch.randn(4096, 4096, device="cuda")

    def work():
        result = a
        for _ in range(20):
            result = result @ a / 4096
        return result

    work()
    torch.cuda.synchronize()
    started = time.perf_counter()  # the same work timed the synchronising way
    work()
    torch.cuda.synchronize()
    synchronised_seconds = time.perf_counter() - started
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with StageTimer("cuda") as timer:
            work()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert 0.5 * synchronised_seconds < float(timer) < 1.5 * synchronised_seconds
