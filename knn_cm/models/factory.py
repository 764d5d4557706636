"""Build a preconditioned denoiser from plain arguments (the Hydra entry point of ``configs/train/model``).

``configs/train/model/*.yaml`` instantiate ``build_denoiser`` with ``_target_``:

    _target_: knn_cm.models.build_denoiser
    _convert_: all
    precond: edm                      # 'edm' -> EDMPrecond, 'cm' -> CMPrecond
    precond_kwargs: {sigma_data: 0.5, amp_dtype: null}
    network: {img_resolution: ${dataset.resolution}, in_channels: ${dataset.channels}, ...}

Switching the parameterisation is one override (``model.precond=cm``); wrapper-specific defaults
(sigma_min 0 for EDM, 0.002 for CM) apply unless ``precond_kwargs`` sets them.
"""

from __future__ import annotations

from collections.abc import Mapping

from knn_cm.models.precond import CMPrecond, EDMPrecond, FMPrecond
from knn_cm.models.song_unet import SongUNet

PRECONDITIONERS = {"edm": EDMPrecond, "cm": CMPrecond, "fm": FMPrecond}


def build_denoiser(
    network: Mapping,
    precond: str = "edm",
    precond_kwargs: Mapping | None = None,
) -> EDMPrecond | CMPrecond | FMPrecond:
    """``PRECONDITIONERS[precond](SongUNet(**network), **precond_kwargs)``.

    network: SongUNet keyword arguments (EDM names, plus ``fourier_scale``).
    precond: 'edm' (EDMPrecond), 'cm' (CMPrecond) or 'fm' (FMPrecond, a flow-matching velocity network).
    precond_kwargs: wrapper keyword arguments, e.g. sigma_data, sigma_min, c_noise_scale, amp_dtype.
    """
    if precond not in PRECONDITIONERS:
        raise ValueError(f"precond={precond!r} is not supported; allowed: {', '.join(map(repr, PRECONDITIONERS))}")
    model = SongUNet(**dict(network))
    return PRECONDITIONERS[precond](model, **dict(precond_kwargs or {}))
