"""The residual U-Net block of DDPM++ / NCSN++ with optional self-attention (EDM's ``UNetBlock``).

Submodules are registered in EDM's order (norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj)
so that ``state_dict`` entries come out in EDM's order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knn_cm.models.dropout import dropout as apply_dropout
from knn_cm.models.layers import Conv2d, GroupNorm, Linear


def _autocast_disabled(device: torch.device):
    """Disable autocast locally so a computation runs in float32 even inside an AMP region."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax over keys of q.k / sqrt(C), computed in float32 (also under autocast).

    q, k: [B, C, L] (B = batch x heads, L = H W positions) -> weights [B, L_query, L_key] in q's dtype.
    """
    with _autocast_disabled(q.device):
        scaled_k = k.to(torch.float32) / math.sqrt(k.shape[1])
        logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), scaled_k)
        return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block with additive noise conditioning and optional self-attention.

    Computes (Song et al. 2021, DDPM++/NCSN++; EDM's SongUNet settings):
        h = conv0(silu(norm0(x))) + affine(emb)
        h = conv1(dropout(silu(norm1(h))))
        x = (h + skip(x)) * skip_scale
        if attention: x = (proj(attn(norm2(x))) + x) * skip_scale

    x [N, in_channels, H, W], emb [N, emb_channels] -> [N, out_channels, H', W'] (H' = 2H for up,
    H/2 for down). ``skip`` is a 1x1 convolution (with the resampling) when the channel count changes or
    the block resamples, else the identity. Attention has ``num_heads`` heads; its ``qkv`` convolution
    interleaves channels (channel 3c + j of each head is q, k, v for j = 0, 1, 2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[float] = (1, 1),
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0.0})
        init_attn = dict(init_attn if init_attn is not None else init)
        if attention and (num_heads < 1 or out_channels % num_heads):
            raise ValueError(f"UNetBlock: num_heads={num_heads} must be >= 1 and divide out_channels={out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        h = F.silu(self.norm1(h))
        h = self.conv1(apply_dropout(h, p=self.dropout, training=self.training))
        skip = residual if self.skip is None else self.skip(residual)
        x = (h + skip.to(h.dtype)) * self.skip_scale
        if self.num_heads:
            x = (self._attend(x) + x) * self.skip_scale
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """proj(softmax(q.k / sqrt(C)) v) for x [N, C, H, W]; channels per head C = out_channels / heads."""
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm2(x))
        qkv = qkv.reshape(batch * self.num_heads, channels // self.num_heads, 3, height * width)
        q, k, v = qkv.unbind(2)
        weights = attention_weights(q, k)
        attended = torch.einsum("nqk,nck->ncq", weights, v.to(weights.dtype))
        return self.proj(attended.reshape(batch, channels, height, width))
