"""A network denoiser D(z, sigma) behind the estimator contract."""

from __future__ import annotations

import torch

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.registry import register_estimator
from knn_cm.settings import positive_int


@register_estimator("network")
class NetworkEstimator(Estimator):
    """Wraps any denoiser ``D(z [B, C, H, W], sigma [B]) -> x_hat [B, C, H, W]`` (e.g. EDMPrecond).

    Runs without gradient tracking on the denoiser's own device and dtype; the store, when given,
    only checks z's shape.
    """

    needs_store = False
    uses_rows = False

    def __init__(self, denoiser, store=None, **kwargs):
        super().__init__(store, **kwargs)
        if not callable(denoiser):
            raise ValueError(f"denoiser must be callable as D(z, sigma), got {type(denoiser).__name__}")
        self.denoiser = denoiser

    def __call__(self, z, sigma, x=None, generator=None):
        # Validated on z's device: the denoiser runs there, so sigma never crosses host and device.
        _, sigma, _ = self._validate(z, sigma, None, device=z.device)
        with torch.no_grad():
            return self.denoiser(z, sigma.to(dtype=torch.float32))

    def repeated(self, z, sigma, repeats, x=None, generator=None):
        """A network is deterministic: one evaluation, repeated R times [R, B, C, H, W]."""
        repeats = positive_int(repeats, "repeats")
        return self(z, sigma).unsqueeze(0).expand(repeats, *z.shape)

    def augmented_target(self, pipe, augmentation, z, sigma, x_augmented, generator=None, host_seed=None):
        """Refused: a network's estimate is not a posterior mean over the augmented training images."""
        raise ValueError("the 'network' estimator has no target under augmentation; set "
                         "trainer.objective.augment=null or train with a dataset estimator")
