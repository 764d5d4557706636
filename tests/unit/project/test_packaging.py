"""pyproject's ranges admit only what the code needs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]


def requirement(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(line) for line in dependencies if Requirement(line).name == name)


def test_torch_range_starts_where_the_cuda_grad_scaler_exists():
    """torch.amp.GradScaler("cuda") (the trainer's fp16 path) arrived in torch 2.3; 2.1 and 2.2 would fail."""
    torch = requirement("torch").specifier
    assert not torch.contains(Version("2.2.2")) and torch.contains(Version("2.3.0"))
    assert torch.contains(Version("2.14.1")) and not torch.contains(Version("2.15.0"))


def test_hydra_is_pinned_below_the_next_minor_release():
    """The stable sweeper imports hydra._internal, which a minor release may change."""
    hydra = requirement("hydra-core").specifier
    assert hydra.contains(Version("1.3.2")) and not hydra.contains(Version("1.4.0"))
