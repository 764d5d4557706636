"""Seeds that need no saved state: a hash that derives a micro-step's seed from the run's seed, rank and step."""

from __future__ import annotations


def splitmix64(value: int) -> int:
    """SplitMix64's mixing function (Steele et al. 2014): a well-spread 64-bit hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)
