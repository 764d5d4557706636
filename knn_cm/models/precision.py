"""Mixed precision for the inner network: a guarded ``torch.autocast`` region.

The preconditioning wrappers compute their coefficients and outputs in float32 and run only the inner
network under ``autocast_context``. Rules (kept deliberately simple):

- ``amp_dtype=None``: no autocast anywhere (float32).
- CUDA: autocast with float16 or bfloat16.
- CPU: autocast only for bfloat16 (CPU float16 autocast is slow and poorly supported, so it is a no-op).
- Other devices: no-op.

Attention logits and softmax stay float32 inside the region (see ``blocks.attention_weights``).
"""

from __future__ import annotations

import contextlib

import torch

_AMP_DTYPE_NAMES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_amp_dtype(amp_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Map None / 'none' / torch.float16 / torch.bfloat16 / their names to a dtype or None."""
    if amp_dtype is None or amp_dtype in ("none", "None", "null", "float32", "fp32"):
        return None
    if isinstance(amp_dtype, str):
        if amp_dtype not in _AMP_DTYPE_NAMES:
            allowed = ", ".join(["None", *_AMP_DTYPE_NAMES])
            raise ValueError(f"amp_dtype={amp_dtype!r} is not supported; allowed: {allowed}")
        return _AMP_DTYPE_NAMES[amp_dtype]
    if amp_dtype in (torch.float16, torch.bfloat16):
        return amp_dtype
    if amp_dtype == torch.float32:
        return None
    raise ValueError(f"amp_dtype={amp_dtype!r} is not supported; allowed: None, torch.float16, torch.bfloat16")


def autocast_context(device: torch.device | str, amp_dtype: torch.dtype | None):
    """An autocast region for ``device`` and ``amp_dtype`` following the module's rules, else a no-op."""
    device = torch.device(device)
    if amp_dtype is None:
        return contextlib.nullcontext()
    if device.type == "cuda" or (device.type == "cpu" and amp_dtype == torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=amp_dtype)
    return contextlib.nullcontext()
