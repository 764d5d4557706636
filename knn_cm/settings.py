"""Checks of plain setting values from configs and the command line, with errors that name the setting.

    num_samples = positive_int(config.num_samples, "num_samples")   # 0, -1, 1.5, "abc", true -> ValueError
"""

from __future__ import annotations

import numbers


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value, setting: str) -> int:
    """``value`` as an int >= 1; a ValueError naming ``setting``, the value and what is allowed otherwise."""
    if not _is_integer(value) or value < 1:
        raise ValueError(f"{setting} must be an integer >= 1, got {value!r}")
    return int(value)


def non_negative_int(value, setting: str) -> int:
    """``value`` as an int >= 0; a ValueError naming ``setting`` otherwise."""
    if not _is_integer(value) or value < 0:
        raise ValueError(f"{setting} must be an integer >= 0, got {value!r}")
    return int(value)


def boolean(value, setting: str) -> bool:
    """``value`` as a bool (true / false only); a ValueError naming ``setting`` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{setting} must be true or false, got {value!r}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def non_negative_number(value, setting: str) -> float:
    """``value`` as a float >= 0; a ValueError naming ``setting``, the value and what is allowed otherwise."""
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{setting} must be a number >= 0, got {value!r}")
    return float(value)


def unit_interval_number(value, setting: str) -> float:
    """``value`` as a float in [0, 1); a ValueError naming ``setting`` otherwise."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{setting} must be a number in [0, 1), got {value!r}")
    return float(value)
