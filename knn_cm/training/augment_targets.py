"""Regression targets for EDM training under augmentation (``trainer.objective.augment``; docs/training.md).

Under augmentation the network D(z, sigma, a) sees z = T_a x + sigma eps, x ~ D, with the labels a of the
transform T_a. Its ideal output is the posterior mean over the distribution it is trained on,
E[T_a x | z, sigma, a] = sum_i softmax_i(-||z - T_a x_i||^2 / (2 sigma^2)) T_a x_i. Each estimator keeps its
target an estimate of that (never of the unaugmented posterior E[x | z], which is the wrong distribution):

- ``single`` (EDM): the augmented source T_a x, a draw from that posterior (unbiased).
- ``stf``: STF's own recipe (Xu et al. 2023 train on EDM's pipe): the reference batch is augmented, the
  minibatch's augmented sources plus the other reference images each augmented independently; the target
  is the self-normalised average over it, a posterior mean over the augmented empirical distribution.
- ``knn`` (and any estimator over the dataset: exact, mc, uniform): where T_a only flips and turns the image
  (an orthogonal permutation of pixels, so ||z - T x_i|| = ||T^-1 z - x_i||), the target is
  T_a est(T_a^-1 z), which is exactly the estimator's estimate of the augmented posterior mean. Where T_a
  also resamples or translates (not orthogonal: distances to T_a x_i cannot be searched in the dataset's
  index), the target is the augmented source T_a x, the unbiased single-sample estimate of the same
  posterior mean; the share of such targets is logged (``augment_source_targets``).
"""

from __future__ import annotations

import torch

from knn_cm.estimators.distances import log_likelihood, reference_log_likelihoods, reference_sq_dists, sq_norms
from knn_cm.estimators.draws import draw_uniform_rows
from knn_cm.training.augment import Augmentation, AugmentPipe

# Estimators whose posterior is over the dataset rows and that take no source (the orthogonal rule applies).
DATASET_ESTIMATORS = ("knn", "exact", "mc", "uniform")


def augmented_target(estimator, pipe: AugmentPipe, augmentation: Augmentation, z: torch.Tensor, sigma: torch.Tensor,
                     x_augmented: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict]:
    """Target [B, C, H, W] for noisy z [B, C, H, W] = x_augmented + sigma [B] eps, and statistics.

    Args:
        estimator: the objective's estimator (its ``name`` picks the rule above).
        pipe: the augmentation pipe (STF augments its other reference images with it).
        augmentation: what ``pipe.augment`` did to the sources.
        x_augmented: the augmented sources T_a x [B, C, H, W].
        generator: the estimator's generator (STF's reference draws and their augmentation).
    """
    name = getattr(estimator, "name", None)
    if name == "single":
        return x_augmented.clone(), {"augment_source_targets": 1.0}
    if name == "stf":
        return _stf_target(estimator, pipe, z, sigma, x_augmented, generator), {"augment_source_targets": 0.0}
    if name in DATASET_ESTIMATORS:
        exact_rule = augmentation.orthogonal_only.to(z.device)
        target = x_augmented.clone()
        if bool(exact_rule.any()):
            query = augmentation.invert_orthogonal(z)[exact_rule]
            estimate = estimator(query, sigma[exact_rule], generator=generator)
            subset = _subset(augmentation, exact_rule.cpu())
            target[exact_rule] = subset.apply_orthogonal(estimate)
        return target, {"augment_source_targets": float((~exact_rule).float().mean())}
    raise ValueError(f"no augmented-target rule for the {name!r} estimator; allowed under trainer.objective.augment: "
                     f"single, stf, {', '.join(DATASET_ESTIMATORS)} (or set trainer.objective.augment=null)")


def _subset(augmentation: Augmentation, keep: torch.Tensor) -> Augmentation:
    return Augmentation(labels=augmentation.labels[keep.to(augmentation.labels.device)], xflip=augmentation.xflip[keep],
                        yflip=augmentation.yflip[keep], quarter_turns=augmentation.quarter_turns[keep],
                        shift=augmentation.shift[keep], inverse_map=augmentation.inverse_map[keep],
                        resampled=augmentation.resampled[keep])


def _stf_target(estimator, pipe: AugmentPipe, z, sigma, x_augmented, generator):
    """STF (both variants, as ``knn_cm.estimators.stf``) over a reference batch augmented image by image."""
    batch, shape = z.shape[0], z.shape[1:]
    variant, n = estimator.variant, estimator.n
    others = n - batch if variant == "shared" else n - 1
    if others < 0:
        raise ValueError(f"shared STF needs n >= batch size ({batch}) to hold every source, got n={n}")
    rows = draw_uniform_rows(estimator.rows, others, generator)
    # Each other reference image gets its own augmentation (STF's training code augments the whole batch).
    reference = pipe.augment(rows.reshape(others, *shape), _cpu_generator(generator))[0] if others else rows
    reference = reference.reshape(others, -1).to(device=estimator.device, dtype=estimator.dtype)
    z_flat = z.reshape(batch, -1).to(device=estimator.device, dtype=estimator.dtype)
    x_flat = x_augmented.reshape(batch, -1).to(device=estimator.device, dtype=estimator.dtype)
    sigma = sigma.to(device=estimator.device, dtype=estimator.dtype)
    with torch.no_grad():
        if variant == "shared":
            reference = torch.cat([x_flat, reference])
            out = torch.softmax(reference_log_likelihoods(z_flat, sigma, reference), dim=1) @ reference
        else:
            source_sq_dist = sq_norms(z_flat - x_flat)
            sq_dists = torch.cat([reference_sq_dists(z_flat, sigma, reference, best_known=source_sq_dist),
                                  source_sq_dist.unsqueeze(1)], dim=1)
            weights = torch.softmax(log_likelihood(sq_dists, sigma), dim=1)
            out = weights[:, :-1] @ reference + weights[:, -1:] * x_flat
    return out.reshape(z.shape).to(device=z.device, dtype=z.dtype)


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The pipe draws on the CPU: a CUDA generator seeds a CPU one (deterministically, from its own stream)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)
