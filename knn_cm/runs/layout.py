"""The run folder's layout: every file and folder a run holds, named in this one place.

    <run>/config.yaml              the resolved config (written after validation)
    <run>/run.json                 the binding: config digest and dataset fingerprint (knn_cm.runs.binding)
    <run>/.lock                    held by the one process training in the folder
    <run>/invocations.jsonl        each launch's wall-clock record
    <run>/metrics.jsonl            training metrics, one JSON object per logged step
    <run>/train.log                the training log (Hydra's job log)
    <run>/checkpoints/training-<step>.pt (+ .digest)   full training state (knn_cm.runs.checkpoints)
    <run>/snapshots/network-<step>.pt                  EMA network files for sampling and evaluation
    <run>/samples/<sampler>-<step>.png                 sample grids
    <run>/evaluation.jsonl, evaluation.csv             evaluate.py's records and table
    <run>/tswitch.csv                                  the t_switch sweep's table

Steps are written with nine digits so names sort by step. Training, evaluation, the report and the campaign
take their paths from :class:`RunLayout`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STEP_DIGITS = 9
CHECKPOINT_PATTERN = re.compile(r"training-(\d{9})\.pt$")
SNAPSHOT_PATTERN = re.compile(r"network-(\d{9})\.pt$")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (nothing is created or read here)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------------------------ files at the top
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def binding(self) -> Path:
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def invocations(self) -> Path:
        return self.root / "invocations.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def evaluation_log(self) -> Path:
        return self.root / "evaluate.log"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluation.jsonl"

    @property
    def evaluation_table(self) -> Path:
        return self.root / "evaluation.csv"

    @property
    def tswitch_table(self) -> Path:
        return self.root / "tswitch.csv"

    # ------------------------------------------------------------------------------------ per step
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"training-{step:0{STEP_DIGITS}d}.pt"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"network-{step:0{STEP_DIGITS}d}.pt"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def sample_grid(self, sampler: str, step: int) -> Path:
        return self.samples / f"{sampler}-{step:0{STEP_DIGITS}d}.png"

    # ----------------------------------------------------------------------------------- listings
    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every training checkpoint, oldest first."""
        return _numbered(self.checkpoints, "training-*.pt", CHECKPOINT_PATTERN)

    def list_snapshots(self) -> list[tuple[int, Path]]:
        """(step, path) of every EMA network snapshot, oldest first."""
        return _numbered(self.snapshots, "network-*.pt", SNAPSHOT_PATTERN)


def _numbered(folder: Path, glob: str, pattern: re.Pattern) -> list[tuple[int, Path]]:
    found = [(int(match.group(1)), path) for path in folder.glob(glob) if (match := pattern.search(path.name))]
    return sorted(found)


def resolve_network_path(path: str | Path) -> Path:
    """A network file itself, or the newest snapshot of a run folder; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        snapshots = RunLayout(path).list_snapshots()
        if not snapshots:
            raise FileNotFoundError(f"run folder {path} has no snapshots/network-*.pt; pass a network file instead")
        return snapshots[-1][1]
    if not path.is_file():
        raise FileNotFoundError(f"network {path} does not exist (expected a network file or a run folder)")
    return path
