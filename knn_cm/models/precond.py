"""Preconditioned denoisers: EDM's D(x, sigma) and the consistency-model f(z, sigma).

Both wrap a network F (e.g. ``SongUNet``) held as the submodule ``model`` (so ``state_dict`` keys are
``model.*``, as in EDM checkpoints) and compute, with sd = sigma_data,

    out(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

in float32; only F may run under autocast (``amp_dtype``). They share the call signature
``den(x, sigma, class_labels=None, augment_labels=None)`` so samplers and losses accept either:

    x      [N, C, H, W] noisy images (data in [-1, 1] plus noise of standard deviation sigma)
    sigma  [N], or a scalar / one-element tensor / float broadcast to [N]; must be > 0
    class_labels [N, label_dim] (zeros if omitted for a conditional network; as in EDM, one label row
           [label_dim] or [1, label_dim] applies to the whole batch), augment_labels [N, augment_dim]
    out    [N, C, H, W] float32 estimate of the clean image
"""

from __future__ import annotations

import math

import torch
from torch import nn

from knn_cm.models.precision import autocast_context, resolve_amp_dtype


class _PreconditionedDenoiser(nn.Module):
    """Shared plumbing of the wrappers; subclasses define ``coefficients``."""

    def __init__(self, model: nn.Module, sigma_data: float, sigma_min: float, sigma_max: float, amp_dtype):
        super().__init__()
        for attribute in ("in_channels", "out_channels", "img_resolution"):
            if not hasattr(model, attribute):
                raise ValueError(f"{type(self).__name__}: model {type(model).__name__} has no attribute {attribute!r}")
        if model.in_channels != model.out_channels:
            raise ValueError(
                f"{type(self).__name__}: model maps {model.in_channels} to {model.out_channels} channels; "
                "a denoiser needs out_channels == in_channels"
            )
        if not sigma_data > 0:
            raise ValueError(f"{type(self).__name__}: sigma_data={sigma_data} must be > 0")
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"{type(self).__name__}: need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.amp_dtype = resolve_amp_dtype(amp_dtype)

    @property
    def img_resolution(self) -> int:
        return self.model.img_resolution

    @property
    def img_channels(self) -> int:
        return self.model.in_channels

    @property
    def label_dim(self) -> int:
        return getattr(self.model, "label_dim", 0)

    @property
    def precond_kwargs(self) -> dict:
        """Constructor keyword arguments except ``model`` and ``amp_dtype`` (stored in checkpoints)."""
        return dict(sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def round_sigma(self, sigma) -> torch.Tensor:
        """Identity on noise levels (kept for EDM sampler compatibility)."""
        return torch.as_tensor(sigma)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) each [N, 1, 1, 1] and c_noise [N], for float32 sigma [N]."""
        raise NotImplementedError

    def _sigma_batch(self, sigma, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(
                f"{type(self).__name__}: sigma has {sigma.numel()} elements; expected 1 or the batch size {x.shape[0]}"
            )
        self._check_sigma(sigma)
        return sigma

    def _check_sigma(self, sigma: torch.Tensor) -> None:
        """sigma > 0 (c_noise uses ln sigma): a clear error on the CPU; on a GPU an asynchronous device-side
        assert, since reading the values back would stall every training step."""
        if sigma.device.type != "cpu":
            torch._assert_async(torch.all(sigma > 0), f"{type(self).__name__}: sigma must be > 0")
        elif not bool(torch.all(sigma > 0)):
            raise ValueError(
                f"{type(self).__name__}: sigma must be > 0 (c_noise uses ln sigma); got min {sigma.min().item()}"
            )

    def _class_label_batch(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Float32 class labels [N, label_dim]: zeros if None, a single row repeated over the batch."""
        if class_labels is None:
            return torch.zeros(x.shape[0], self.label_dim, device=x.device)
        if class_labels.numel() % self.label_dim or class_labels.numel() // self.label_dim not in (1, x.shape[0]):
            raise ValueError(
                f"{type(self).__name__}: class_labels has shape {list(class_labels.shape)}; expected "
                f"[{x.shape[0]}, {self.label_dim}] or a single row of {self.label_dim} labels"
            )
        class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return class_labels.expand(x.shape[0], self.label_dim)

    def forward(
        self,
        x: torch.Tensor,
        sigma,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__}: x has shape {list(x.shape)}; expected [N, C, H, W]")
        x = x.to(torch.float32)
        sigma = self._sigma_batch(sigma, x)
        if self.label_dim:
            class_labels = self._class_label_batch(class_labels, x)
        elif class_labels is not None:
            raise ValueError(
                f"{type(self).__name__}: class_labels given but the network is unconditional (label_dim=0)"
            )
        if augment_labels is not None:
            augment_labels = augment_labels.to(torch.float32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        with autocast_context(x.device, self.amp_dtype):
            raw = self.model(c_in * x, c_noise, class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * raw.to(torch.float32)


class EDMPrecond(_PreconditionedDenoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1), sd = sigma_data:

        c_skip = sd^2 / (sigma^2 + sd^2)      c_out = sigma sd / sqrt(sigma^2 + sd^2)
        c_in   = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4

    ``D = den(x, sigma, class_labels=None, augment_labels=None)``; shapes in the module docstring.
    sigma_min / sigma_max describe the supported range for samplers (EDM: 0 and +inf).
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        amp_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(model, sigma_data, sigma_min, sigma_max, amp_dtype)

    def coefficients(self, sigma: torch.Tensor):
        sigma_data = self.sigma_data
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log().reshape(-1) / 4
        return c_skip, c_out, c_in, c_noise


class CMPrecond(_PreconditionedDenoiser):
    """Consistency-model parameterisation (Song et al. 2023, iCT 2024), sd = sigma_data:

        c_skip  = sd^2 / ((sigma - sigma_min)^2 + sd^2)
        c_out   = (sigma - sigma_min) sd / sqrt(sd^2 + sigma^2)
        c_in    = 1 / sqrt(sigma^2 + sd^2)
        c_noise = c_noise_scale ln(sigma)        (0.25 as in EDM; OpenAI's code uses 1000 * 0.25)

    so f(z, sigma_min) = z exactly (the boundary condition: c_skip = 1, c_out = 0).
    ``f = den(z, sigma, class_labels=None, augment_labels=None)``; shapes in the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        c_noise_scale: float = 0.25,
        amp_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(model, sigma_data, sigma_min, sigma_max, amp_dtype)
        if not (math.isfinite(c_noise_scale) and c_noise_scale > 0):
            raise ValueError(f"CMPrecond: c_noise_scale={c_noise_scale} must be a finite number > 0")
        self.c_noise_scale = float(c_noise_scale)

    @property
    def precond_kwargs(self) -> dict:
        return dict(super().precond_kwargs, c_noise_scale=self.c_noise_scale)

    def coefficients(self, sigma: torch.Tensor):
        sigma_data = self.sigma_data
        sigma = sigma.reshape(-1, 1, 1, 1)
        distance = sigma - self.sigma_min
        c_skip = sigma_data**2 / (distance**2 + sigma_data**2)
        c_out = distance * sigma_data / (sigma_data**2 + sigma**2).sqrt()
        c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
        c_noise = self.c_noise_scale * sigma.log().reshape(-1)
        return c_skip, c_out, c_in, c_noise


class FMPrecond(_PreconditionedDenoiser):
    """A velocity network v(x_t, t) for flow matching on x_t = (1 - t) x + t eps (``FlowMatchingProcess``),
    with sd = sigma_data:

        v = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t)),   with  r(t)^2 = (1 - t)^2 sd^2 + t^2 = Var[x_t]:
        c_in    = 1 / r(t)                         (unit-variance input)
        c_skip  = (t - (1 - t) sd^2) / r(t)^2      (Cov[eps - x, x_t] / Var[x_t]: the best linear guess of eps - x)
        c_out   = sd / r(t)                        (the residual's standard deviation: F's target has unit variance)
        c_noise = 1000 t                           (DDPM's time-step scale; SD3 and diffusers feed 1000 t too)

    Karras et al. 2022 (EDM, Appendix B.6) derive c_in, c_skip and c_out from these variance conditions for the
    denoiser; here they are derived the same way for the velocity target eps - x of the flow-matching path, for
    data of standard deviation sd. c_noise must stay finite on the closed interval [0, 1] (the sampler starts at
    t = 1 and Heun's last correction evaluates t = 0), so EDM's ln(sigma) / 4, infinite at both ends, is not
    used; 1000 t spreads t over the positional embedding's frequencies as in DDPM (Ho et al. 2020). F's
    effective loss weight is w(t) c_out(t)^2: 1 with ``FlowMatchingObjective(weighting="edm")``, between sd^2
    and 1 + sd^2 with the usual uniform weighting (see ``knn_cm.training.flow_matching``).

    ``v = net(x_t, t, class_labels=None, augment_labels=None)``: x_t [N, C, H, W], t [N] (or a scalar) in
    [0, 1]; returns float32 [N, C, H, W]. The second argument is flow-matching time, not a noise level.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, amp_dtype: torch.dtype | str | None = None):
        super().__init__(model, sigma_data, 0.0, 1.0, amp_dtype)

    @property
    def precond_kwargs(self) -> dict:
        return dict(sigma_data=self.sigma_data)

    def _check_sigma(self, t: torch.Tensor) -> None:
        """t in [0, 1] (flow-matching time, not a noise level): a clear error on the CPU; on a GPU an asynchronous
        device-side assert, as the other wrappers' check (a read-back would stall every training step)."""
        inside = ((t >= 0) & (t <= 1)).all()
        if t.device.type != "cpu":
            torch._assert_async(inside, "FMPrecond: t must lie in [0, 1]")
        elif not bool(inside):
            bad = t[~((t >= 0) & (t <= 1))][0].item()
            raise ValueError(f"FMPrecond: t must lie in [0, 1] (flow-matching time, 1 = noise), got {bad!r}")

    def coefficients(self, t: torch.Tensor):
        sigma_data = self.sigma_data
        t = t.reshape(-1, 1, 1, 1)
        variance = (1 - t) ** 2 * sigma_data**2 + t**2
        c_in = variance.rsqrt()
        c_skip = (t - (1 - t) * sigma_data**2) / variance
        c_out = sigma_data * c_in
        c_noise = 1000 * t.reshape(-1)
        return c_skip, c_out, c_in, c_noise
