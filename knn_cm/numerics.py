"""The numeric region estimators and indexes compute in, whatever the caller set: no gradients, no autocast,
IEEE float32 matrix products."""

from __future__ import annotations

import contextlib

import torch


def _matmul_precision_settings() -> tuple[str | None, dict[object, str]]:
    """The caller's float32 matrix-product settings: the legacy precision and the per-backend ones.

    The legacy value (``torch.set_float32_matmul_precision``; ``torch.backends.cuda.matmul.allow_tf32``
    is the same setting) is None where torch refuses to read it: a caller that mixed the legacy and the
    per-backend API (``torch.backends.{cuda,mkldnn}.matmul.fp32_precision``, torch >= 2.9) into a
    state torch calls inconsistent.
    """
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    backends = {}
    for backend in (torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
        if backend is not None and hasattr(backend, "fp32_precision"):
            backends[backend] = backend.fp32_precision
    return legacy, backends


@contextlib.contextmanager
def ieee_float32_matmuls():
    """float32 matrix products in IEEE float32 inside, whatever the caller set; the caller's settings after.

    TF32 (``allow_tf32``, ``set_float32_matmul_precision("high")``) rounds products' inputs to 10 mantissa
    bits, and "medium" to bfloat16 (on CPUs with bf16 units too): the GEMM distances of ``distances`` and
    the torch index would then err by ~1e-3 relative instead of the eps their refinement budgets for
    (``distances.GEMM_ERROR_FACTOR``). The legacy "highest" sets every backend (cuBLAS, oneDNN) to IEEE
    consistently; on exit, exceptions included, the legacy value and each backend's own value are put
    back exactly. cuDNN's TF32 switch is left alone: it governs convolutions, which estimators never run.
    """
    legacy, backends = _matmul_precision_settings()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, value in backends.items():
            backend.fp32_precision = value


def isolated_numerics(device: torch.device) -> contextlib.ExitStack:
    """The region an estimator or index computes in, free of the caller's numeric settings.

    No gradients; no autocast (a training step's bf16 / fp16 region) on the CPU or ``device``, so
    distances and weights are computed in the estimator's own dtype; IEEE float32 matrix products
    (:func:`ieee_float32_matmuls`: no TF32, no bf16 "medium" precision).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    for device_type in {"cpu", device.type}:
        if torch.amp.is_autocast_available(device_type):  # not on meta (shapes only)
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    stack.enter_context(ieee_float32_matmuls())
    return stack
