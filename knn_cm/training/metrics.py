"""Metrics windows: the step records between two logged steps, read back from the device once and averaged."""

from __future__ import annotations

import time

import torch

from knn_cm.training.stage_timer import resolve_timers


def read_back(window: list[dict]) -> list[dict]:
    """Step records with device tensors and stage timers as Python numbers (one stack per key, one read each)."""
    resolved = [resolve_timers(entry) for entry in window]
    for key in window[-1]:
        tensors = [entry[key] for entry in resolved if isinstance(entry.get(key), torch.Tensor)]
        if tensors:
            values = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
            for entry, value in zip((e for e in resolved if isinstance(e.get(key), torch.Tensor)), values):
                entry[key] = value
    return resolved


def window_record(window: list[dict], seconds: float, batch_size: int, step: int, images_seen: int) -> dict:
    """One metrics record for the steps of ``window`` (``seconds`` of wall clock): the mean of every numeric
    entry, seconds per step, images per second and the estimator's share of a step."""
    window = read_back(window)
    record = {"step": step, "images_seen": images_seen, "time": time.time()}
    for key in window[-1]:
        values = [entry[key] for entry in window if isinstance(entry.get(key), (int, float))]
        if values:
            record[key] = sum(values) / len(values)
    record["seconds_per_step"] = seconds / len(window)
    record["images_per_s"] = len(window) * batch_size / max(seconds, 1e-9)
    if "estimator_seconds" in record:
        record["estimator_share"] = record["estimator_seconds"] / max(record["seconds_per_step"], 1e-12)
    return record
