"""Evaluate every EMA snapshot of a training run: FID / IS against the training set and memorisation.

Results are appended to ``<run>/evaluation.jsonl`` as each snapshot finishes (an interrupted evaluation
resumes where it stopped: snapshots already evaluated with the same settings are skipped), and
``<run>/evaluation.csv`` lists them all with the minimum-FID snapshot marked, as Table 1 reports.
Every FID is stored with its sample count.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from knn_cm.data import DataStore
from knn_cm.evaluation.fidelity import compute_fidelity
from knn_cm.evaluation.memorisation import memorisation
from knn_cm.evaluation.snapshots import list_snapshots
from knn_cm.index import Index, build_index
from knn_cm.io import write_csv_rows
from knn_cm.models import load_network_file, network_from_payload
from knn_cm.sampling import generate, make_sampler, resolve_kind
from knn_cm.training.logging import MetricsLog, read_metrics

EVALUATION_FIELDS = ("step", "images_seen", "network", "sampler", "num_samples", "feature_extractor", "fid",
                     "isc_mean", "isc_std", "fraction_memorised", "mean_nearest_distance", "seconds", "best")


def evaluate_samples(samples: torch.Tensor, store: DataStore, metrics: Mapping, device="cpu",
                     index: Index | None = None) -> dict:
    """FID / IS (``metrics``: feature_extractor, inception_weights, fid, isc) and memorisation of
    samples [M, C, H, W] in [-1, 1] against the training set ``store`` (``index``: a flat index of it,
    built here when not given; callers evaluating many sample sets pass one)."""
    record = {"num_samples": int(samples.shape[0]), "feature_extractor": metrics.get("feature_extractor")}
    if metrics.get("fid", True) or metrics.get("isc", True):
        record.update(compute_fidelity(samples, store, feature_extractor=metrics["feature_extractor"],
                                       fid=metrics.get("fid", True), isc=metrics.get("isc", True), device=device,
                                       inception_weights=metrics.get("inception_weights")))
    if metrics.get("memorisation", True):
        stats = memorisation(samples, store, index=index)
        record.update({key: stats[key] for key in ("fraction_memorised", "mean_nearest_distance")})
    return record


def memorisation_index(store: DataStore, metrics: Mapping) -> Index | None:
    """The flat index memorisation searches, built once per store (None when memorisation is off)."""
    return build_index(store, "flat") if metrics.get("memorisation", True) else None


def evaluate_run(run_dir: str | Path, store: DataStore, sampler: Mapping, metrics: Mapping, num_samples: int,
                 seed_start: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                 progress: bool = True) -> list[dict]:
    """Evaluate each snapshot of ``run_dir`` not yet evaluated with these settings; returns all records.

    Args:
        store: the training set (without x-flip doubling) that FID and memorisation compare against.
        sampler: ``make_sampler`` arguments (``kind`` "auto": one-step consistency for iCT, Heun for EDM).
        metrics: ``feature_extractor`` ("inception" or "digits"), ``inception_weights``, ``fid``, ``isc``,
            ``memorisation``.
        num_samples: samples per snapshot (the paper: 50,000); sample i uses seed seed_start + i.
    """
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise FileNotFoundError(f"{run_dir} has no snapshots/network-*.pt to evaluate")
    log = MetricsLog(run_dir, "evaluation.jsonl")
    done = read_metrics(log.path) if log.path.exists() else []
    seeds = range(seed_start, seed_start + num_samples)
    index = None
    for step, path in snapshots:
        payload = load_network_file(path, map_location=device)
        kind = resolve_kind(sampler.get("kind", "auto"), payload["precond_class"])
        settings = {"network": path.name, "sampler": kind, "num_samples": num_samples,
                    "feature_extractor": metrics["feature_extractor"]}
        if any(all(record.get(k) == v for k, v in settings.items()) for record in done):
            continue
        network = network_from_payload(payload, device, source=str(path))
        index = index or memorisation_index(store, metrics)
        started = time.perf_counter()
        samples = generate(make_sampler(network=network, store=store, **(dict(sampler) | {"kind": kind})), seeds,
                           store.shape, batch_size=batch_size, device=device, progress=progress)
        record = {"step": step, "images_seen": payload["metadata"].get("images_seen"),
                  **settings, **evaluate_samples(samples, store, metrics, device, index)}
        record["seconds"] = time.perf_counter() - started
        log.log(record)
        done.append(record)
    records = [r for r in done if r.get("feature_extractor") == metrics["feature_extractor"]]
    write_evaluation_table(records, run_dir / "evaluation.csv")
    return records


def write_evaluation_table(records: list[dict], path: str | Path) -> None:
    """CSV of evaluation records with ``best`` = 1 on the minimum-FID record (per sample count)."""
    best = {}
    for record in records:
        fid, count = record.get("fid"), record.get("num_samples")
        if fid is not None and (count not in best or fid < best[count]["fid"]):
            best[count] = record
    ordered = sorted(records, key=lambda r: (r.get("num_samples", 0), r.get("step", 0)))
    write_csv_rows(path, EVALUATION_FIELDS,
                   (record | {"best": int(best.get(record.get("num_samples")) is record)} for record in ordered))
