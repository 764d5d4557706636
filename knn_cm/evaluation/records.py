"""Evaluation records of a run folder: what identifies one, and the table of them.

A record in ``<run>/evaluation.jsonl`` holds its results (FID, IS, memorisation, seconds) and every
setting that changes them, :data:`KEY_FIELDS`: the snapshot file's name and content digest, the
sampler kind and the settings that kind reads, the estimator spec (samplers that use one), the seeds
(``seed_start``, ``num_samples``), the batch size (multistep and estimator samplers draw their noise
per batch), the feature extractor and its weights version, and the metric flags. A snapshot counts as
evaluated only when a record has exactly these values; a changed setting or a retrained snapshot gives
a new record, never an old number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from knn_cm.io import write_csv_rows

KEY_FIELDS = ("network", "network_digest", "sampler", "sampler_settings", "estimator", "seed_start", "num_samples",
              "batch_size", "feature_extractor", "extractor_version", "metrics")
SNAPSHOT_FIELDS = ("network", "network_digest")
TABLE_FIELDS = ("step", "images_seen", "network", "network_digest", "sampler", "sampler_settings", "estimator",
                "seed_start", "num_samples", "batch_size", "feature_extractor", "metrics", "fid", "isc_mean",
                "isc_std", "fraction_memorised", "mean_nearest_distance", "seconds", "best")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def record_key(record: Mapping, fields: Iterable[str] = KEY_FIELDS) -> str:
    """A string equal for two records exactly when their ``fields`` are equal (absent fields count as None)."""
    return _canonical({field: record.get(field) for field in fields})


def settings_key(record: Mapping) -> str:
    """The key without the snapshot: records with equal settings keys form one comparison (one ``best``)."""
    return record_key(record, [field for field in KEY_FIELDS if field not in SNAPSHOT_FIELDS])


def _cell(value):
    """CSV cell: nested settings as compact JSON (e.g. ``{"sigma_min":0.002,"sigmas":[80.0,0.821]}``)."""
    return _canonical(value) if isinstance(value, (Mapping, list)) else value


def write_evaluation_table(records: list[dict], path: str | Path) -> None:
    """CSV of evaluation records, one row per record, ``best`` = 1 on the minimum-FID record of each
    group of records with the same settings (sampler, seeds, count, extractor, metrics)."""
    best: dict[str, dict] = {}
    for record in records:
        fid, group = record.get("fid"), settings_key(record)
        if fid is not None and (group not in best or fid < best[group]["fid"]):
            best[group] = record
    ordered = sorted(records, key=lambda r: (settings_key(r), r.get("step") or 0))
    write_csv_rows(path, TABLE_FIELDS, ({key: _cell(value) for key, value in record.items()}
                                        | {"best": int(best.get(settings_key(record)) is record)}
                                        for record in ordered))
