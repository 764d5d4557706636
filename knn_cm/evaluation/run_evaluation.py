"""Evaluate every EMA snapshot of a training run: FID / IS against the training set and memorisation.

Results are appended to ``<run>/evaluation.jsonl`` as each snapshot finishes. A snapshot is skipped
only when a record has the same key (:mod:`knn_cm.evaluation.records`: snapshot content digest, sampler
kind and settings, estimator, seeds, count, batch size, feature extractor and weights, metric flags), so
an interrupted evaluation resumes where it stopped and any changed setting is evaluated afresh.
``<run>/evaluation.csv`` lists the records of the snapshots now in the run folder with their settings,
the minimum-FID snapshot of each group of equal settings marked, as Table 1 reports.

Everything that can fail without sampling is checked first: the settings, the feature extractor and the
Inception weights (a missing file or an impossible download fails before any sample is generated).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from knn_cm.data import DataStore
from knn_cm.estimators import build_estimator
from knn_cm.evaluation.memorisation import memorisation
from knn_cm.evaluation.records import KEY_FIELDS, record_key, write_evaluation_table
from knn_cm.models import load_network_file, network_from_payload
from knn_cm.runs.jsonl import JsonLinesLog, read_json_lines
from knn_cm.runs.layout import RunLayout
from knn_cm.sampling import generate, make_sampler, resolve_kind
from knn_cm.sampling.generate import USES_ESTIMATOR, sampler_settings
from knn_cm.search import FaissIndex, build_index
from knn_cm.settings import boolean, non_negative_int, positive_int

METRIC_FLAGS = ("fid", "isc", "memorisation")


def prepare_metrics(metrics: Mapping, num_samples: int) -> dict:
    """Checked metric settings, with the feature extractor's weights resolved now (before any sampling).

    Returns ``metrics`` with the flags as bools, ``inception_weights`` the checked local path (Inception),
    and ``extractor_version`` identifying the extractor's weights (None when neither FID nor IS is on).

    Raises:
        ValueError: a flag that is not a bool, an unknown extractor, too few samples for FID / IS.
        InceptionWeightsUnavailable: the Inception weights file is absent, not the published file, or
            cannot be downloaded; the message names ``metrics.inception_weights=PATH`` and the download.
    """
    from knn_cm.evaluation.feature_extractors import INCEPTION, get_extractor_spec, resolve_inception_weights
    from knn_cm.evaluation.fidelity import ISC_SPLITS

    prepared = dict(metrics)
    for flag in METRIC_FLAGS:
        prepared[flag] = boolean(metrics.get(flag, True), f"metrics.{flag}")
    prepared["extractor_version"] = None
    if not (prepared["fid"] or prepared["isc"]):
        return prepared
    try:
        spec = get_extractor_spec(metrics.get("feature_extractor"))
    except ValueError as error:
        raise ValueError(f"metrics.feature_extractor: {error}") from None
    if prepared["fid"] and num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for metrics.fid=true, got {num_samples}")
    if prepared["isc"] and spec.isc_feature is None:
        raise ValueError(f"metrics.feature_extractor={spec.name!r} has no logits for the Inception Score; "
                         f"set metrics.isc=false")
    if prepared["isc"] and num_samples < ISC_SPLITS:
        raise ValueError(f"num_samples must be >= {ISC_SPLITS} for metrics.isc=true (IS splits), got {num_samples}")
    if spec.name == INCEPTION:
        prepared["inception_weights"] = str(resolve_inception_weights(metrics.get("inception_weights")))
    prepared["extractor_version"] = spec.cache_token()
    return prepared


def evaluate_samples(samples: torch.Tensor, store: DataStore, metrics: Mapping, device="cpu",
                     index: FaissIndex | None = None) -> dict:
    """FID / IS (``metrics``: feature_extractor, inception_weights, fid, isc) and memorisation of
    samples [M, C, H, W] in [-1, 1] against the training set ``store`` (``index``: a flat index of it,
    built here when not given; callers evaluating many sample sets pass one)."""
    from knn_cm.evaluation.fidelity import compute_fidelity

    record = {"num_samples": int(samples.shape[0]), "feature_extractor": metrics.get("feature_extractor"),
              "fid": None, "isc_mean": None, "isc_std": None}
    if metrics.get("fid", True) or metrics.get("isc", True):
        record.update(compute_fidelity(samples, store, feature_extractor=metrics["feature_extractor"],
                                       fid=metrics.get("fid", True), isc=metrics.get("isc", True), device=device,
                                       inception_weights=metrics.get("inception_weights")))
    if metrics.get("memorisation", True):
        stats = memorisation(samples, store, index=index)
        record.update({key: stats[key] for key in ("fraction_memorised", "mean_nearest_distance")})
    return record


def memorisation_index(store: DataStore, metrics: Mapping) -> FaissIndex | None:
    """The flat index memorisation searches, built once per store (None when memorisation is off)."""
    return build_index(store, "flat") if metrics.get("memorisation", True) else None


def evaluate_run(run_dir: str | Path, store: DataStore, sampler: Mapping, metrics: Mapping, num_samples: int,
                 seed_start: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                 progress: bool = True, estimator: Mapping | None = None) -> list[dict]:
    """Evaluate each snapshot of ``run_dir`` not yet evaluated with these settings.

    Args:
        store: the training set (without x-flip doubling) that FID and memorisation compare against.
        sampler: ``make_sampler`` arguments (``kind`` "auto": one-step consistency for iCT, Heun for EDM).
        metrics: ``feature_extractor`` ("inception" or "digits"), ``inception_weights``, ``fid``, ``isc``,
            ``memorisation``.
        num_samples: samples per snapshot (the paper: 50,000); sample i uses seed seed_start + i.
        estimator: the estimator spec (``knn_cm.estimators.factory`` schema) for the pf_ode and hybrid samplers.

    Returns:
        This evaluation's record of every snapshot, oldest first.
    """
    run_dir = Path(run_dir)
    num_samples = positive_int(num_samples, "num_samples")
    batch_size = positive_int(batch_size, "batch_size")
    seed_start = non_negative_int(seed_start, "seed_start")
    layout = RunLayout(run_dir)
    snapshots = layout.list_snapshots()
    if not snapshots:
        raise FileNotFoundError(f"{run_dir} has no snapshots/network-*.pt to evaluate")
    metrics = prepare_metrics(metrics, num_samples)
    flags = {flag: metrics[flag] for flag in METRIC_FLAGS}
    log = JsonLinesLog(layout.evaluations)
    done = read_json_lines(log.path)
    evaluated = {record_key(record): record for record in done}
    seeds = range(seed_start, seed_start + num_samples)
    index = built_estimator = None
    current, present = [], set()
    for step, path in snapshots:
        payload = load_network_file(path, map_location=device)
        kind = resolve_kind(sampler.get("kind", "auto"), payload["precond_class"])
        uses_estimator = kind in USES_ESTIMATOR
        if uses_estimator and estimator is None:
            raise ValueError(f"sampler.kind={kind} needs an estimator (estimator.name=knn ...)")
        settings = {"network": path.name, "network_digest": payload["digest"], "sampler": kind,
                    "sampler_settings": sampler_settings(kind, sampler),
                    "estimator": dict(estimator) if uses_estimator else None, "seed_start": seed_start,
                    "num_samples": num_samples, "batch_size": batch_size,
                    "feature_extractor": metrics["feature_extractor"] if metrics["extractor_version"] else None,
                    "extractor_version": metrics["extractor_version"], "metrics": flags}
        present.add((path.name, payload["digest"]))
        key = record_key(settings)
        if key in evaluated:
            current.append(evaluated[key])
            continue
        network = network_from_payload(payload, device, source=str(path))
        index = index or memorisation_index(store, metrics)
        if uses_estimator and built_estimator is None:
            built_estimator = build_estimator(estimator, store, device)
        started = time.perf_counter()
        make = dict(sampler) | {"kind": kind}
        samples = generate(make_sampler(network=network, estimator=built_estimator, store=store, **make), seeds,
                           store.shape, batch_size=batch_size, device=device, progress=progress)
        results = evaluate_samples(samples, store, metrics, device, index)
        record = {"step": step, "images_seen": payload["metadata"].get("images_seen"),
                  **{k: v for k, v in results.items() if k not in KEY_FIELDS}, **settings,
                  "seconds": time.perf_counter() - started}
        log.log(record)
        evaluated[key] = record
        done.append(record)
        current.append(record)
    table = [r for r in done if (r.get("network"), r.get("network_digest")) in present]
    write_evaluation_table(table, layout.evaluation_table)
    return current
