"""The estimator contract: ``x_hat = est(z, sigma, x=None, generator=None)``.

Every estimator returns an estimate of the posterior mean E[x | z, sigma] (Eq. 8) for the VE/EDM
process z = x + sigma * eps, in data space ([-1, 1]), with the shape of ``z``. The score follows from
Eq. 5: grad log p_sigma(z) = (E[x | z, sigma] - z) / sigma^2. Other processes (VP) reach the same
contract through the query z / s(t) and noise level sigma(t) (Appendix B; see ``knn_cm.diffusion``).
Because networks, the exact posterior and the KNN estimator share this signature they are
interchangeable in losses and samplers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from knn_cm.data.resident import resolve_storage
from knn_cm.data.store import DataStore
from knn_cm.device import as_device, is_accelerator, to_device_async
from knn_cm.numerics import isolated_numerics
from knn_cm.settings import positive_int

# Value checks on tensors that live on a GPU: "async" uses a device-side assertion (no host
# synchronisation; a failure aborts the CUDA context at a later kernel launch, with the message),
# "off" skips them. Tensors on the CPU (and Python numbers) are always checked on the host with a
# clear ValueError: there the check costs nothing.
VALUE_CHECKS = ("async", "off")


def sigma_floor(dtype: torch.dtype) -> float:
    """Smallest sigma whose square is a normal number of ``dtype`` (1.1e-19 in float32, 1.5e-154 in float64).

    Below it sigma^2 underflows and no likelihood weight exp(-d / (2 sigma^2)) can be formed; above it
    weights are formed relative to each query's nearest candidate, so they stay finite.
    """
    return math.sqrt(torch.finfo(dtype).tiny)


class Estimator:
    """Base class: validates input, moves it to the estimator's device and dtype, and defines score.

    Subclasses implement :meth:`posterior_mean` on flat tensors.

    Args:
        store: the dataset the estimator averages over (None for network estimators).
        device: where to compute (default: CPU); data rows are made resident there once.
        dtype: compute dtype (float32, or float64 for reference computations).
        storage: how the store's rows are held on ``device`` (see :meth:`DataStore.resident`; "auto": uint8
            on CUDA, float32 on CPU up to 4 GiB, else the store's own array mapped in place).
        sync_free: use the code path that never synchronises with the host: fixed shapes, no
            ``.item()`` / ``bool(tensor)`` / ``.cpu()``, no branch on tensor values (draws and duplicate
            handling included). Default: on an accelerator (CUDA, or meta standing in for it). On CPU the
            default path groups queries by their number of distinct draws instead, which is faster there; both
            give the same estimates up to float rounding (tested).
        value_checks: how values (sigma range, NaN / inf in z and x) of CUDA tensors are checked:
            "async" (default: device-side assertion) or "off". See :data:`VALUE_CHECKS`.
    """

    name = "base"  # set by register_estimator (knn_cm.estimators.registry)
    needs_store = True  # False for estimators that need no dataset (single, network)
    needs_source = False  # True when the estimator requires the clean source x
    uses_rows = True  # False for estimators that never read the store's rows (single, network)
    needs_index = False  # True when the estimator searches an index (knn; see knn_cm.estimators.factory)

    def __init__(self, store: DataStore | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, storage: str = "auto", sync_free: bool | None = None,
                 value_checks: str = "async"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if value_checks not in VALUE_CHECKS:
            raise ValueError(f"value_checks must be one of {', '.join(VALUE_CHECKS)}, got {value_checks!r}")
        self.store = store
        self.device = as_device(device, "estimator device")
        self.dtype = dtype
        self.storage = storage
        self.sync_free = is_accelerator(self.device) if sync_free is None else bool(sync_free)
        self.value_checks = value_checks
        if store is not None:
            resolve_storage(storage, self.device, len(store), store.dim, dtype)  # fail early on a bad storage
            if self.sync_free and self.uses_rows:
                self.rows  # noqa: B018  (made resident now: building them synchronises, calls must not)

    @property
    def rows(self):
        """The store's rows [N, d] resident on this estimator's device (built on first use)."""
        return self.store.resident(self.device, self.dtype, self.storage)

    # ------------------------------------------------------------------------------------ contract
    def __call__(self, z: torch.Tensor, sigma, x: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior-mean estimate [B, C, H, W] for noisy z [B, C, H, W] at noise levels sigma [B].

        Args:
            z: noisy images in data scale (z = x + sigma * eps), floating point.
            sigma: noise levels, a float or a tensor [B] (or [B, 1, 1, 1]); each finite and
                >= :func:`sigma_floor` of the compute dtype.
            x: clean sources [B, C, H, W] where the caller has them (single-sample and STF use them).
            generator: torch.Generator on the estimator's device for the estimator's random draws.
        """
        z_flat, sigma, x_flat = self._validate(z, sigma, x)
        with self._computing():
            x_hat = self.posterior_mean(z_flat, sigma, x_flat, generator)
        return x_hat.reshape(z.shape).to(device=z.device, dtype=z.dtype)

    def repeated(self, z: torch.Tensor, sigma, repeats: int, x: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``repeats`` independent estimates for the same queries: [R, B, C, H, W].

        Estimators override :meth:`repeated_posterior_mean` to share per-query work (the KNN search,
        the exact posterior) across repeats; the estimates have the same distribution as R calls.
        """
        repeats = positive_int(repeats, "repeats")
        z_flat, sigma, x_flat = self._validate(z, sigma, x)
        with self._computing():
            x_hat = self.repeated_posterior_mean(z_flat, sigma, x_flat, repeats, generator)
        return x_hat.reshape(repeats, *z.shape).to(device=z.device, dtype=z.dtype)

    def _computing(self):
        """The caller's numeric settings kept out of the estimator (see :func:`isolated_numerics`)."""
        return isolated_numerics(self.device)

    def repeated_posterior_mean(self, z: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor | None, repeats: int,
                                generator: torch.Generator | None) -> torch.Tensor:
        """[R, B, d] estimates on flat tensors; by default R calls of :meth:`posterior_mean`."""
        return torch.stack([self.posterior_mean(z, sigma, x, generator) for _ in range(repeats)])

    def score(self, z: torch.Tensor, sigma, x: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Score estimate (x_hat - z) / sigma^2 (Eq. 5), same shape as ``z``."""
        x_hat = self(z, sigma, x=x, generator=generator)
        sigma = self._sigma_vector(sigma, z.shape[0], z.device, z.dtype)
        return (x_hat - z) / sigma.reshape(-1, *([1] * (z.ndim - 1))) ** 2

    def augmented_target(self, pipe, augmentation, z: torch.Tensor, sigma: torch.Tensor, x_augmented: torch.Tensor,
                         generator: torch.Generator | None = None, host_seed: int | None = None
                         ) -> tuple[torch.Tensor, dict]:
        """The regression target [B, C, H, W] under EDM's augmentation, and statistics (docs/training.md).

        The network D(z, sigma, a) sees z = T_a x + sigma eps, x from the data, with the labels a of the transform
        T_a; its ideal output is the posterior mean over the distribution it is trained on,
        E[T_a x | z, sigma, a] = sum_i softmax_i(-||z - T_a x_i||^2 / (2 sigma^2)) T_a x_i. Every estimator's
        target is an estimate of that, never of the unaugmented E[x | z]. This default serves estimators over
        the dataset (knn, exact, mc, uniform, the local denoisers): where T_a only flips and turns the image (a
        permutation of pixels, so ||z - T x_i|| = ||T^-1 z - x_i||) the target is T_a est(T_a^-1 z), exactly the
        estimator's estimate of the augmented posterior mean; where T_a also resamples or translates (distances
        to T_a x_i cannot be searched in the dataset), the augmented source T_a x, the unbiased single-sample
        estimate of the same mean. The share of such targets is ``augment_source_targets``.

        Which images take which rule is known on the host (the pipe drew it there): no device value is read.

        Args:
            pipe: the augmentation pipe (``pipe.augment(images, generator) -> (images, augmentation)``).
            augmentation: what the pipe did to the sources (``orthogonal_only`` [B] bool on the host,
                ``apply_orthogonal``, ``invert_orthogonal``).
            z: noisy images [B, C, H, W] = x_augmented + sigma eps; sigma [B].
            x_augmented: the augmented sources T_a x [B, C, H, W].
            generator: the estimator's generator.
            host_seed: the training step's seed for draws made on the host (STF's reference augmentation).
        """
        exact_rule = augmentation.orthogonal_only  # [B] bool, host
        share_of_sources = float((~exact_rule).float().mean())  # a host read
        if not bool(exact_rule.any()):
            return x_augmented.clone(), {"augment_source_targets": share_of_sources}
        rows = exact_rule.nonzero().flatten()
        rows_on_device = to_device_async(rows, z.device)
        query = augmentation.invert_orthogonal(z).index_select(0, rows_on_device)
        estimate = self(query, sigma.index_select(0, rows_on_device), generator=generator)
        # T_a per image over the whole batch (fixed shapes, the flags already on the device), kept where chosen.
        transformed = augmentation.apply_orthogonal(torch.zeros_like(z).index_copy(0, rows_on_device, estimate))
        target = x_augmented.index_copy(0, rows_on_device, transformed.index_select(0, rows_on_device))
        return target, {"augment_source_targets": share_of_sources}

    def posterior_mean(self, z: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor | None,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Estimate on flat tensors: z [B, d], sigma [B], x [B, d] or None -> x_hat [B, d]."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- validation
    @staticmethod
    def _sigma_vector(sigma, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """sigma as [B] on ``device``: a Python number is filled in on the device (no host-to-device copy)."""
        if isinstance(sigma, (int, float, np.floating, np.integer)) and not isinstance(sigma, bool):
            return torch.full((batch,), float(sigma), device=device, dtype=dtype)
        sigma = torch.as_tensor(sigma)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(batch)
        elif sigma.numel() == batch:
            sigma = sigma.reshape(batch)
        else:
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got shape "
                             f"{tuple(sigma.shape)}")
        return sigma.to(device=device, dtype=dtype)

    def _check_sigma_values(self, sigma) -> None:
        floor = sigma_floor(self.dtype)
        if isinstance(sigma, torch.Tensor) and sigma.device.type != "cpu":
            if self.value_checks == "async":
                torch._assert_async(((sigma >= floor) & torch.isfinite(sigma)).all(),
                                    f"sigma must be finite and >= {floor:.3g}")
            return
        values = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        bad = ~torch.isfinite(values) | (values <= 0)
        if bool(bad.any()):
            raise ValueError(f"sigma must be finite and > 0, got {values[bad][0].item()!r} "
                             f"(at position {int(bad.nonzero()[0, 0])})")
        if bool((values < floor).any()):
            raise ValueError(f"sigma must be >= {floor:.3g} for {self.dtype} weights (below it sigma^2 is not a "
                             f"normal {self.dtype} number and exp(-d / (2 sigma^2)) cannot be formed), got "
                             f"{values.min().item()!r}; use dtype=torch.float64 for smaller sigma")

    def _check_finite(self, name: str, tensor: torch.Tensor) -> None:
        # One reduction: NaN and inf propagate into the sum; float64 so large finite values cannot overflow.
        total = tensor.sum(dtype=torch.float64)
        if tensor.device.type != "cpu":
            if self.value_checks == "async":
                torch._assert_async(torch.isfinite(total), f"{name} holds NaN or inf values")
            return
        if not bool(torch.isfinite(total)):
            raise ValueError(f"{name} holds NaN or inf values; estimators need finite inputs")

    def _validate(self, z, sigma, x, device: torch.device | None = None):
        """Checks, then (z [B, d], sigma [B], x [B, d] or None) on ``device`` (default: the estimator's)."""
        device = self.device if device is None else device
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"z must be a torch.Tensor [B, C, H, W], got {type(z).__name__}")
        for name, tensor in (("z", z), ("x", x)):
            if tensor is not None and not tensor.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor in data scale [-1, 1], got dtype "
                                 f"{tensor.dtype}; convert uint8 pixels with knn_cm.data.uint8_to_float")
        if self.store is not None and tuple(z.shape[1:]) != self.store.shape:
            raise ValueError(f"z has shape {tuple(z.shape)} but the store {self.store.name!r} holds images of "
                             f"shape {self.store.shape}: z must be [B, {', '.join(map(str, self.store.shape))}]")
        if z.ndim < 2 or z.shape[0] < 1:
            raise ValueError(f"z must be a batch [B, ...] with B >= 1, got shape {tuple(z.shape)}")
        batch = z.shape[0]
        if isinstance(sigma, torch.Tensor) and sigma.numel() not in (1, batch):
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got shape "
                             f"{tuple(sigma.shape)}")
        self._check_sigma_values(sigma)
        sigma = self._sigma_vector(sigma, batch, device, self.dtype)
        self._check_finite("z", z)
        if x is not None and tuple(x.shape) != tuple(z.shape):
            raise ValueError(f"x must have the shape of z {tuple(z.shape)}, got {tuple(x.shape)}")
        if x is not None:
            self._check_finite("x", x)
        if x is None and self.needs_source:
            raise ValueError(f"the {self.name!r} estimator needs the clean source x (est(z, sigma, x=x))")
        flat = lambda tensor: tensor.reshape(batch, -1).to(device=device, dtype=self.dtype)
        return flat(z), sigma, None if x is None else flat(x)

