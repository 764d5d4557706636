"""The estimator-error study of Section 4.2 (Figures 3, 6, 7, 12).

For each noise level t: draw M sources x_i from the dataset and one z_i ~ N(x_i, t^2 I) each; compute
the exact posterior mean mu_i (Eq. 8) once per z_i, shared by every estimator; evaluate each estimator
R times per z_i; report per pixel (Eq. 15)

    MSE      = mean_i mean_r ||mu_hat_ir - mu_i||^2 / d
    bias^2   = mean_i ||mean_r mu_hat_ir - mu_i||^2 / d
    variance = mean_i mean_r ||mu_hat_ir - mean_r mu_hat_ir||^2 / d

The variance uses the 1/R (plug-in) normalisation, so MSE = bias^2 + variance holds exactly per z
(the unbiased 1/(R - 1) variance is R / (R - 1) times larger). Score errors are the same quantities
divided by t^4, since score - true score = (mu_hat - mu) / t^2 (Eq. 5). Each value comes with a 95%
confidence interval over the M sources (normal approximation, 1.96 standard errors).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from knn_cm.data import DataStore
from knn_cm.estimators import Estimator, make_estimator
from knn_cm.io import write_csv_rows

METRICS = ("mse", "bias2", "variance")
TARGETS = ("posterior_mean", "score")
VELOCITY_TARGETS = ("posterior_mean", "velocity")  # the flow-matching study's (knn_cm.evaluation.velocity_error)
CSV_FIELDS = ("estimator", "t", "target", "metric", "value", "ci_low", "ci_high", "num_sources", "repeats")


@dataclass
class LevelErrors:
    """Per-source errors of one estimator at one noise level: arrays [M] per metric (posterior mean)."""

    per_source: dict[str, list[np.ndarray]] = field(default_factory=lambda: {m: [] for m in METRICS})

    def add(self, draws: torch.Tensor, reference: torch.Tensor) -> None:
        """draws [R, B, ...] of one estimator, reference [B, ...] the exact posterior means."""
        draws = draws.reshape(draws.shape[0], draws.shape[1], -1).to(torch.float64)
        reference = reference.reshape(reference.shape[0], -1).to(torch.float64)
        mean = draws.mean(dim=0)
        self.per_source["mse"].append((draws - reference).square().mean(dim=(0, 2)).cpu().numpy())
        self.per_source["bias2"].append((mean - reference).square().mean(dim=1).cpu().numpy())
        self.per_source["variance"].append((draws - mean).square().mean(dim=(0, 2)).cpu().numpy())

    def rows(self, name: str, t: float, repeats: int, targets=TARGETS, derived_scale: float | None = None
             ) -> list[dict]:
        """Rows of the posterior-mean errors and of a target derived from them by a factor per t: the score's
        (Eq. 5, errors / t^4: the default) or the flow-matching velocity's (errors / t^2)."""
        derived_scale = t**-4 if derived_scale is None else derived_scale
        out = []
        for target in targets:
            scale = 1.0 if target == "posterior_mean" else derived_scale
            for metric in METRICS:
                values = np.concatenate(self.per_source[metric]) * scale
                mean = float(values.mean())
                half_width = 1.96 * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
                out.append({"estimator": name, "t": t, "target": target, "metric": metric, "value": mean,
                            "ci_low": mean - half_width, "ci_high": mean + half_width,
                            "num_sources": len(values), "repeats": repeats})
        return out


def estimator_error_study(store: DataStore, estimators: Mapping[str, Estimator], times: Sequence[float],
                          num_sources: int = 256, repeats: int = 16, batch_size: int = 128, seed: int = 0,
                          exact: Estimator | None = None, device: str | torch.device = "cpu",
                          progress: bool = True) -> list[dict]:
    """Run the Section 4.2 protocol; returns one row per estimator x t x target x metric.

    Args:
        store: the dataset D (sources are drawn from it, and the exact posterior is over it).
        estimators: name -> estimator (each evaluated ``repeats`` times per z).
        times: noise levels t (sigma(t) = t).
        num_sources: M, sources (and noisy queries) per level.
        repeats: R, evaluations per z; 1 gives no variance estimate (deterministic networks).
        batch_size: queries per estimator call.
        seed: the sources, noise and estimator draws derive from it (level by level).
        exact: the reference estimator (default: ``exact`` over ``store`` on ``device``).
    """
    if num_sources < 1 or repeats < 1 or batch_size < 1:
        raise ValueError(f"num_sources, repeats and batch_size must be >= 1, "
                         f"got {num_sources}, {repeats}, {batch_size}")
    if not times or any(not (math.isfinite(t) and t > 0) for t in times):
        raise ValueError(f"times must be a non-empty list of finite noise levels > 0, got {list(times)}")
    exact = exact or make_estimator("exact", store, device=device)
    batches = [(start, min(start + batch_size, num_sources)) for start in range(0, num_sources, batch_size)]
    bar = _progress(len(times) * len(batches), progress)
    rows = []
    for level, t in enumerate(times):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + level)
        draw_generator = torch.Generator(device=exact.device).manual_seed(seed * 1_000_003 + level + 7)
        ids = torch.randint(0, len(store), (num_sources,), generator=generator)
        errors = {name: LevelErrors() for name in estimators}
        for start, stop in batches:
            x = store.float(ids[start:stop]).to(exact.device)
            z = x + t * torch.randn(x.shape, generator=generator).to(exact.device)
            reference = exact(z, t)
            for name, estimator in estimators.items():
                errors[name].add(estimator.repeated(z, t, repeats, x=x, generator=draw_generator), reference)
            bar.set_postfix(t=f"{t:g}")
            bar.update(1)
        for name in estimators:
            rows.extend(errors[name].rows(name, float(t), repeats))
    bar.close()
    return rows


def write_csv(rows: Sequence[Mapping], path: str | Path) -> None:
    """Write study rows to ``path`` atomically (columns :data:`CSV_FIELDS`)."""
    write_csv_rows(path, CSV_FIELDS, ({key: row[key] for key in CSV_FIELDS} for row in rows))


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by :func:`write_csv`, numbers parsed."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("t", "value", "ci_low", "ci_high"):
            row[key] = float(row[key])
        for key in ("num_sources", "repeats"):
            row[key] = int(row[key])
    return rows


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="estimator study", unit="batch", disable=not enabled)
