"""Regression targets under data augmentation (EDM training with ``trainer.objective.augment``; docs/training.md).

Under augmentation the network D(z, sigma, a) sees z = T_a x + sigma eps, x ~ D, with the labels a of the
transform T_a. Its ideal output is the posterior mean over the distribution it is trained on,
E[T_a x | z, sigma, a] = sum_i softmax_i(-||z - T_a x_i||^2 / (2 sigma^2)) T_a x_i. Each estimator keeps its
target an estimate of that (never of the unaugmented posterior E[x | z], which is the wrong distribution), by
a rule chosen by its class (:data:`RULES`):

- :class:`~knn_cm.estimators.single.SingleSample` (EDM): the augmented source T_a x, a draw from that
  posterior (unbiased).
- :class:`~knn_cm.estimators.stf.STF`: STF's own recipe (Xu et al. 2023 train on EDM's pipe): the reference
  batch is augmented, the minibatch's augmented sources plus the other reference images each augmented
  independently; the target is STF's self-normalised average over it, a posterior mean over the augmented
  empirical distribution.
- the estimators over the dataset (knn, exact, mc, uniform): where T_a only flips and turns the image (an
  orthogonal permutation of pixels, so ||z - T x_i|| = ||T^-1 z - x_i||), the target is T_a est(T_a^-1 z),
  which is exactly the estimator's estimate of the augmented posterior mean. Where T_a also resamples or
  translates (not orthogonal: distances to T_a x_i cannot be searched in the dataset's index), the target is
  the augmented source T_a x, the unbiased single-sample estimate of the same posterior mean; the share of
  such targets is logged (``augment_source_targets``).

The pipe and the augmentation record come from ``knn_cm.training.augment`` and are used through their
interface only: ``pipe.augment(images, generator) -> (images, augmentation)``; ``augmentation`` a dataclass
of per-image tensors with ``orthogonal_only`` [B] bool, ``apply_orthogonal`` and ``invert_orthogonal``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from knn_cm.device import host_generator, to_device_async
from knn_cm.estimators.base import Estimator
from knn_cm.estimators.draws import draw_uniform_rows
from knn_cm.estimators.exact import ExactPosterior, PosteriorMC
from knn_cm.estimators.knn import KNN
from knn_cm.estimators.single import SingleSample
from knn_cm.estimators.stf import STF
from knn_cm.estimators.uniform import UniformSNIS
from knn_cm.models.dropout import active_dropout_seed

# Distinguishes STF's reference augmentation from the other draws made under one micro-step's seed.
_STF_AUGMENT_STREAM = 0x2545F4914F6CDD1D
# rule(estimator, pipe, augmentation, z, sigma, x_augmented, generator) -> (target, statistics)
Rule = Callable[..., tuple[torch.Tensor, dict]]


def augmented_target(estimator: Estimator, pipe, augmentation, z: torch.Tensor, sigma: torch.Tensor,
                     x_augmented: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Target [B, C, H, W] for noisy z [B, C, H, W] = x_augmented + sigma [B] eps, and statistics.

    Args:
        estimator: the objective's estimator; its class (or nearest base class in :data:`RULES`) picks the rule.
        pipe: the augmentation pipe (STF augments its other reference images with it).
        augmentation: what ``pipe.augment`` did to the sources.
        x_augmented: the augmented sources T_a x [B, C, H, W].
        generator: the estimator's generator (its draws; STF's reference draws and their augmentation).
    """
    rule = next((RULES[cls] for cls in type(estimator).__mro__ if cls in RULES), None)
    if rule is None:
        allowed = ", ".join(sorted(cls.name for cls in RULES))
        raise ValueError(f"no augmented-target rule for the {getattr(estimator, 'name', type(estimator).__name__)!r} "
                         f"estimator; allowed under trainer.objective.augment: {allowed} (or set "
                         f"trainer.objective.augment=null)")
    return rule(estimator, pipe, augmentation, z, sigma, x_augmented, generator)


def augmented_source(estimator, pipe, augmentation, z, sigma, x_augmented, generator):
    """The single-sample rule: T_a x itself."""
    return x_augmented.clone(), {"augment_source_targets": 1.0}


def stf_over_augmented_reference(estimator: STF, pipe, augmentation, z, sigma, x_augmented, generator):
    """STF (both variants, :meth:`STF.mean_with_sources`) over a reference batch augmented image by image."""
    z_flat, sigma, x_flat = estimator._validate(z, sigma, x_augmented)
    count = estimator.other_count(z.shape[0], with_sources=True)
    others = draw_uniform_rows(estimator.rows, count, generator, estimator.sync_free)
    if count:  # each other reference image gets its own augmentation (STF's training code augments the whole batch)
        others = pipe.augment(others.reshape(count, *z.shape[1:]), _host_generator(generator))[0]
        others = others.reshape(count, -1).to(device=estimator.device, dtype=estimator.dtype)
    with estimator._computing():
        out = estimator.mean_with_sources(z_flat, sigma, x_flat, others)
    return out.reshape(z.shape).to(device=z.device, dtype=z.dtype), {"augment_source_targets": 0.0}


def estimate_in_the_unaugmented_frame(estimator: Estimator, pipe, augmentation, z, sigma, x_augmented, generator):
    """The dataset estimators' rule: T_a est(T_a^-1 z) where T_a is orthogonal, else T_a x.

    Which images take which rule is known on the host (the pipe drew it there): no device value is read.
    """
    exact_rule = augmentation.orthogonal_only  # [B] bool, host
    share_of_sources = float((~exact_rule).float().mean())  # a host read
    if not bool(exact_rule.any()):
        return x_augmented.clone(), {"augment_source_targets": share_of_sources}
    rows = exact_rule.nonzero().flatten()
    rows_on_device = to_device_async(rows, z.device)
    query = augmentation.invert_orthogonal(z).index_select(0, rows_on_device)
    estimate = estimator(query, sigma.index_select(0, rows_on_device), generator=generator)
    target = x_augmented.index_copy(0, rows_on_device, augmentation.subset(rows).apply_orthogonal(estimate))
    return target, {"augment_source_targets": share_of_sources}


RULES: dict[type[Estimator], Rule] = {
    SingleSample: augmented_source,
    STF: stf_over_augmented_reference,
    KNN: estimate_in_the_unaugmented_frame,
    ExactPosterior: estimate_in_the_unaugmented_frame,
    PosteriorMC: estimate_in_the_unaugmented_frame,
    UniformSNIS: estimate_in_the_unaugmented_frame,
}


def _host_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The pipe draws on the host: a CPU generator is used as it is; a device generator is replaced, inside a
    training step, by a CPU one seeded from the step's seed (nothing read from the device), else by one seeded
    with a draw from it."""
    seed = active_dropout_seed()
    return host_generator(generator, None if seed is None else seed ^ _STF_AUGMENT_STREAM)
