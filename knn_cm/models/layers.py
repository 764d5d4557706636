"""Primitive layers of the SongUNet family, named and shaped as in EDM's networks.

Every layer keeps its parameters under the names EDM uses (``weight`` [out, in, ...], ``bias``
[out]) and registers the fixed resampling filter as a buffer called ``resample_filter``, so that
EDM checkpoints load by name (their layouts: ``tests/fixtures/edm_cifar10_{ddpmpp,ncsnpp}.json``).

Initialisation follows EDM's convention: every weight is drawn from one of four variance-scaling
schemes (Glorot & Bengio 2010; He et al. 2015) and multiplied by ``init_weight``; biases use the same
scheme times ``init_bias`` (0 by default, i.e. zero biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def init_weight_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Draw a weight tensor of ``shape`` with unit-gain variance scaling.

    xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); xavier_normal: N(0, 2 / (fan_in + fan_out));
    kaiming_uniform: U(-a, a), a = sqrt(3 / fan_in); kaiming_normal: N(0, 1 / fan_in).
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"init_mode={mode!r} is not supported; allowed: {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """Fully connected layer y = x W^T + b with W [out_features, in_features] (EDM's ``Linear``).

    Input [..., in_features] -> output [..., out_features].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(init_weight_tensor([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(init_weight_tensor([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def make_resample_filter(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D low-pass filter outer(f, f) / sum(f)^2 as a [1, 1, k, k] float32 tensor.

    f = [1, 1] gives 2x2 averaging (down) and nearest-neighbour (up); f = [1, 3, 3, 1] the
    bilinear-like filter of NCSN++.
    """
    taps = torch.as_tensor(list(taps), dtype=torch.float32)
    if taps.ndim != 1 or taps.numel() == 0:
        raise ValueError(f"resample_filter={taps.tolist()} must be a non-empty list of filter taps")
    return (torch.outer(taps, taps) / taps.sum().square()).reshape(1, 1, taps.numel(), taps.numel())


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up- or down-sampling by a fixed filter (EDM's ``Conv2d``).

    Input [N, in_channels, H, W] -> output [N, out_channels, H', W'] with H' = 2H (up), H/2 (down)
    or H. ``kernel`` = 0 gives a parameter-free resampler (only the filter buffer).

    Resampling uses the buffer ``resample_filter`` [1, 1, k, k] as a depthwise filter:
    down = stride-2 convolution with padding (k-1)//2, then the weight convolution;
    up = stride-2 transposed convolution with the filter times 4 (so a constant image keeps its value),
    padding (k-1)//2, then the weight convolution. ``fused_resample`` (down only; used by NCSN++'s
    residual encoder) applies the weight convolution first with padding kernel//2 + (k-1)//2, then the
    stride-2 filter without padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up=True and down=True are mutually exclusive")
        if fused_resample and not (down and kernel):
            raise ValueError(
                f"Conv2d: fused_resample=True needs down=True and kernel > 0 (got up={up}, down={down}, "
                f"kernel={kernel}); fused up-sampling is not part of the SongUNet layouts"
            )
        if kernel < 0:
            raise ValueError(f"Conv2d: kernel={kernel} must be >= 0")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            nn.Parameter(init_weight_tensor([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = (
            nn.Parameter(init_weight_tensor([out_channels], **fans) * init_bias) if kernel and bias else None
        )
        if up or down:
            self.register_buffer("resample_filter", make_resample_filter(resample_filter))
        else:
            self.resample_filter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        weight_pad = 0 if weight is None else weight.shape[-1] // 2
        if self.resample_filter is not None:
            resample_filter = self.resample_filter.to(x.dtype)
            filter_pad = (resample_filter.shape[-1] - 1) // 2
        if self.fused_resample:
            x = F.conv2d(x, weight, padding=weight_pad + filter_pad)
            depthwise = resample_filter.tile([self.out_channels, 1, 1, 1])
            x = F.conv2d(x, depthwise, groups=self.out_channels, stride=2)
        else:
            if self.up:
                depthwise = (resample_filter * 4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, depthwise, groups=self.in_channels, stride=2, padding=filter_pad)
            if self.down:
                depthwise = resample_filter.tile([self.in_channels, 1, 1, 1])
                x = F.conv2d(x, depthwise, groups=self.in_channels, stride=2, padding=filter_pad)
            if weight is not None:
                x = F.conv2d(x, weight, padding=weight_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups (EDM's ``GroupNorm``).

    Input and output [N, C, H, W]; parameters ``weight`` and ``bias`` of shape [C].
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        groups = min(num_groups, num_channels // min_channels_per_group)
        if groups < 1 or num_channels % groups:
            raise ValueError(
                f"GroupNorm: num_channels={num_channels} cannot be split into min({num_groups}, "
                f"{num_channels} // {min_channels_per_group}) = {groups} equal groups; use a multiple of "
                f"{min_channels_per_group} (and of {num_groups} from {num_groups * min_channels_per_group} channels on)"
            )
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of scalar noise labels (Vaswani et al. 2017; DDPM++).

    noise_labels [N] -> [N, num_channels] = [cos(c w_i), sin(c w_i)] with
    w_i = (1 / max_positions)^(i / (num_channels/2 - endpoint)), i = 0 .. num_channels/2 - 1.
    No parameters.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"PositionalEmbedding: num_channels={num_channels} must be even and >= 2")
        if endpoint and num_channels == 2:
            raise ValueError("PositionalEmbedding: endpoint=True needs num_channels >= 4")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=noise_labels.device)
        exponents = exponents / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        phases = torch.outer(noise_labels, freqs.to(noise_labels.dtype))
        return torch.cat([phases.cos(), phases.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of scalar noise labels (Tancik et al. 2020; NCSN++).

    noise_labels [N] -> [N, num_channels] = [cos(2 pi f c), sin(2 pi f c)], with the frequencies
    f ~ N(0, scale^2) [num_channels / 2] stored as the buffer ``freqs`` (checkpoints carry them;
    ``scale`` only sets their initial values: 16 in NCSN++, 0.02 in iCT).
    """

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"FourierEmbedding: num_channels={num_channels} must be even and >= 2")
        self.num_channels = num_channels
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        phases = torch.outer(noise_labels, (2 * math.pi * self.freqs).to(noise_labels.dtype))
        return torch.cat([phases.cos(), phases.sin()], dim=1)
