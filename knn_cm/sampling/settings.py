"""Checks of the sampler settings (configs/common/sampler/default.yaml) before anything is loaded or sampled.

    settings = check_sampler_settings(OmegaConf.to_container(config.sampler), kind="consistency")

Only the settings the resolved kind reads are checked (:data:`~knn_cm.sampling.generate.SAMPLER_SETTINGS`), each
refused with its full key (``sampler.sigmas must hold at least one noise level ...``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from knn_cm.sampling.consistency import _check_consistency_sigmas
from knn_cm.sampling.generate import _DEFAULTS, SAMPLER_SETTINGS
from knn_cm.settings import boolean, positive_int


def _number(value, key: str, minimum: float, inclusive: bool = True, infinite: bool = False) -> float:
    """``value`` as a float >= (or >) ``minimum``; infinity only when ``infinite``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (math.isfinite(value) or infinite) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f"{'>=' if inclusive else '>'} {minimum:g}"
        raise ValueError(f"{key} must be a {'number' if infinite else 'finite number'} {bound}, got {value!r}")
    return float(value)


def check_sampler_settings(settings: Mapping, kind: str, setting: str = "sampler") -> dict:
    """``settings`` with the ones ``kind`` (resolved, not ``auto``) reads checked; a ValueError naming
    ``<setting>.<key>``, the value and what is allowed otherwise."""
    reads = SAMPLER_SETTINGS[kind]
    value = {key: settings.get(key, _DEFAULTS.get(key)) for key in reads}
    key = lambda name: f"{setting}.{name}"
    if "num_steps" in reads:
        positive_int(value["num_steps"], key("num_steps"))
    if "sigma_min" in reads:
        _number(value["sigma_min"], key("sigma_min"), 0.0, inclusive=False)
    if "sigma_max" in reads:
        sigma_max = _number(value["sigma_max"], key("sigma_max"), 0.0, inclusive=False)
        if sigma_max <= value["sigma_min"]:
            raise ValueError(f"{key('sigma_max')} must be > {key('sigma_min')} ({value['sigma_min']!r}), "
                             f"got {sigma_max!r}")
    if "rho" in reads:
        _number(value["rho"], key("rho"), 0.0, inclusive=False)
    if "s_churn" in reads:
        _number(value["s_churn"], key("s_churn"), 0.0)
    if "t_switch" in reads:
        _number(value["t_switch"], key("t_switch"), 0.0, infinite=True)
    if "sigmas" in reads:
        sigmas = value["sigmas"]
        if not isinstance(sigmas, (list, tuple)) or not all(
                isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) for sigma in sigmas):
            raise ValueError(f"{key('sigmas')} must be a list of noise levels, e.g. [80.0] or [80.0, 0.821], "
                             f"got {sigmas!r}")
        try:
            _check_consistency_sigmas(sigmas, value["sigma_min"])
        except ValueError as error:
            raise ValueError(f"{setting}.{error}") from None
    if kind == "consistency":
        boolean(settings.get("clip_denoised", True), key("clip_denoised"))
    return dict(settings)
