"""The estimator contract: ``x_hat = est(z, sigma, x=None, generator=None)``.

Every estimator returns an estimate of the posterior mean E[x | z, sigma] (Eq. 8) for the VE/EDM
process z = x + sigma * eps, in data space ([-1, 1]), with the shape of ``z``. The score follows from
Eq. 5: grad log p_sigma(z) = (E[x | z, sigma] - z) / sigma^2. Other processes (VP) reach the same
contract through the query z / s(t) and noise level sigma(t) (Appendix B; see ``knn_cm.diffusion``).
Because networks, the exact posterior and the KNN estimator share this signature they are
interchangeable in losses and samplers.
"""

from __future__ import annotations

import torch

from knn_cm.data.store import DataStore
from knn_cm.device import as_device


def check_positive_int(name: str, value) -> int:
    """Return ``value`` as int, or raise ValueError naming it unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class Estimator:
    """Base class: validates input, moves it to the estimator's device and dtype, and defines score.

    Subclasses implement :meth:`posterior_mean` on flat tensors.

    Args:
        store: the dataset the estimator averages over (None for network estimators).
        device: where to compute (default: CPU); data rows are made resident there once.
        dtype: compute dtype (float32, or float64 for reference computations).
    """

    name = "base"
    needs_source = False  # True when the estimator requires the clean source x

    def __init__(self, store: DataStore | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.store = store
        self.device = as_device(device, "estimator device")
        self.dtype = dtype

    @property
    def rows(self):
        """The store's rows [N, d] resident on this estimator's device (built on first use)."""
        return self.store.resident(self.device, self.dtype)

    # ------------------------------------------------------------------------------------ contract
    def __call__(self, z: torch.Tensor, sigma, x: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior-mean estimate [B, C, H, W] for noisy z [B, C, H, W] at noise levels sigma [B].

        Args:
            z: noisy images in data scale (z = x + sigma * eps).
            sigma: noise levels, a float or a tensor [B] (or [B, 1, 1, 1]); each finite and > 0.
            x: clean sources [B, C, H, W] where the caller has them (single-sample and STF use them).
            generator: torch.Generator on the estimator's device for the estimator's random draws.
        """
        z_flat, sigma, x_flat = self._validate(z, sigma, x)
        with torch.no_grad():
            x_hat = self.posterior_mean(z_flat, sigma, x_flat, generator)
        return x_hat.reshape(z.shape).to(device=z.device, dtype=z.dtype)

    def repeated(self, z: torch.Tensor, sigma, repeats: int, x: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``repeats`` independent estimates for the same queries: [R, B, C, H, W].

        Estimators override :meth:`repeated_posterior_mean` to share per-query work (the KNN search,
        the exact posterior) across repeats; the estimates have the same distribution as R calls.
        """
        repeats = check_positive_int("repeats", repeats)
        z_flat, sigma, x_flat = self._validate(z, sigma, x)
        with torch.no_grad():
            x_hat = self.repeated_posterior_mean(z_flat, sigma, x_flat, repeats, generator)
        return x_hat.reshape(repeats, *z.shape).to(device=z.device, dtype=z.dtype)

    def repeated_posterior_mean(self, z: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor | None, repeats: int,
                                generator: torch.Generator | None) -> torch.Tensor:
        """[R, B, d] estimates on flat tensors; by default R calls of :meth:`posterior_mean`."""
        return torch.stack([self.posterior_mean(z, sigma, x, generator) for _ in range(repeats)])

    def score(self, z: torch.Tensor, sigma, x: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Score estimate (x_hat - z) / sigma^2 (Eq. 5), same shape as ``z``."""
        x_hat = self(z, sigma, x=x, generator=generator)
        sigma = self._sigma_vector(sigma, z.shape[0]).to(device=z.device, dtype=z.dtype)
        return (x_hat - z) / sigma.reshape(-1, *([1] * (z.ndim - 1))) ** 2

    def posterior_mean(self, z: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Estimate on flat tensors: z [B, d], sigma [B], x [B, d] or None -> x_hat [B, d]."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- validation
    @staticmethod
    def _sigma_vector(sigma, batch: int) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(batch)
        elif sigma.numel() == batch:
            sigma = sigma.reshape(batch)
        else:
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got shape "
                             f"{tuple(sigma.shape)}")
        return sigma

    def _validate(self, z, sigma, x):
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"z must be a torch.Tensor [B, C, H, W], got {type(z).__name__}")
        if self.store is not None and tuple(z.shape[1:]) != self.store.shape:
            raise ValueError(f"z has shape {tuple(z.shape)} but the store {self.store.name!r} holds images of "
                             f"shape {self.store.shape}: z must be [B, {', '.join(map(str, self.store.shape))}]")
        if z.ndim < 2 or z.shape[0] < 1:
            raise ValueError(f"z must be a batch [B, ...] with B >= 1, got shape {tuple(z.shape)}")
        batch = z.shape[0]
        sigma = self._sigma_vector(sigma, batch)
        bad = ~torch.isfinite(sigma) | (sigma <= 0)
        if bool(bad.any()):
            raise ValueError(f"sigma must be finite and > 0, got {sigma[bad][0].item()!r} "
                             f"(at position {int(bad.nonzero()[0, 0])})")
        # One reduction: NaN and inf propagate into the sum; float64 so large finite values cannot overflow.
        if not bool(torch.isfinite(z.sum(dtype=torch.float64))):
            raise ValueError("z holds NaN or inf values; estimators need finite inputs")
        if x is not None and tuple(x.shape) != tuple(z.shape):
            raise ValueError(f"x must have the shape of z {tuple(z.shape)}, got {tuple(x.shape)}")
        if x is None and self.needs_source:
            raise ValueError(f"the {self.name!r} estimator needs the clean source x (est(z, sigma, x=x))")
        flat = lambda tensor: tensor.reshape(batch, -1).to(device=self.device, dtype=self.dtype)  # noqa: E731
        return flat(z), sigma.to(device=self.device, dtype=self.dtype), None if x is None else flat(x)


def log_likelihood(sq_dist: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(z; x, sigma^2 I) up to a constant per query: -||z - x||^2 / (2 sigma^2).

    sq_dist [B, m], sigma [B] -> [B, m]. Constants cancel in every self-normalised weight.
    """
    return sq_dist / (-2.0 * sigma.reshape(-1, 1) ** 2)

