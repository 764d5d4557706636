"""Training checkpoints: the whole state needed to continue a run bit for bit, written durably and verified.

A checkpoint holds the network, its EMA, the optimizer (and fp16 grad scaler), the step and images seen
(the curriculum and data order follow from them), every random generator's state and the run's
metadata. Files are ``<run>/checkpoints/training-<step>.pt`` (loaded with ``weights_only=True``), each with
a digest beside it (``training-<step>.pt.digest``: blake2b and size of the file's bytes).

Write order: the checkpoint goes to a temporary file (fsync'd), its digest is written, then the checkpoint is
renamed into place (folder fsync'd). So a checkpoint under its final name always has its digest, and a kill
at any point leaves either the previous checkpoints only or the new one complete. On resume,
:func:`load_latest_intact` verifies the newest checkpoint and moves a corrupt, truncated or empty one aside
(``*.corrupt``, never deleted) with a warning, then tries the next newest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from knn_cm.io import atomic_path
from knn_cm.runs.layout import RunLayout

log = logging.getLogger(__name__)

DIGEST_SUFFIX = ".digest"
CORRUPT_SUFFIX = ".corrupt"
REQUIRED_KEYS = {"model", "ema", "optimizer", "step", "images_seen", "generators"}


class CorruptCheckpointError(ValueError):
    """A checkpoint file whose bytes do not match its digest, or that torch cannot read."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return RunLayout(run_dir).checkpoint(step)


def digest_path(path: str | Path) -> Path:
    return Path(f"{path}{DIGEST_SUFFIX}")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Training checkpoints of a run folder, oldest first."""
    return [path for _, path in RunLayout(run_dir).list_checkpoints()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


class _DigestingWriter:
    """A binary file that hashes what is written through it (so the digest costs no second read)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.blake2b(digest_size=16), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: str | Path, state: dict, keep: int | None = None) -> Path:
    """Write ``state`` to ``path`` durably with its digest; then keep only the newest ``keep`` checkpoints.

    A full disk raises ``OSError(ENOSPC)`` naming the path; the earlier checkpoints are untouched.
    """
    path = Path(path)
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            writer = _DigestingWriter(handle)
            torch.save(state, writer)
        with atomic_path(digest_path(path), sync_folder=False) as digest_temp:  # the checkpoint's rename syncs it
            digest_temp.write_text(json.dumps({"blake2b": writer.digest.hexdigest(), "bytes": writer.size}) + "\n")
    if keep is not None and keep > 0:
        for old in list_checkpoints(path.parent.parent)[:-keep]:  # <run>/checkpoints/<file>
            old.unlink(missing_ok=True)
            digest_path(old).unlink(missing_ok=True)
    return path


def verify_checkpoint(path: str | Path) -> bool:
    """True when ``path`` matches its digest; False when it has none (written before digests existed).

    Raises :class:`CorruptCheckpointError` when the bytes differ from the digest (truncated, emptied, flipped).
    """
    path, sidecar = Path(path), digest_path(path)
    if not sidecar.is_file():
        return False
    try:
        expected = json.loads(sidecar.read_text())
        expected_digest, expected_size = str(expected["blake2b"]), int(expected["bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"{sidecar} is not a checkpoint digest ({error})") from error
    digest, size = hashlib.blake2b(digest_size=16), 0
    with open(path, "rb") as handle:
        while block := handle.read(16 << 20):
            digest.update(block)
            size += len(block)
    if size != expected_size or digest.hexdigest() != expected_digest:
        raise CorruptCheckpointError(f"{path} is corrupt: {size} bytes with digest {digest.hexdigest()}, its digest "
                                     f"file says {expected_size} bytes, {expected_digest}")
    return True


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read and verify a training checkpoint (``weights_only=True``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verified = verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle errors, empty file: all mean "not a readable checkpoint"
        raise CorruptCheckpointError(f"{path} cannot be read as a checkpoint ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(state, dict) or REQUIRED_KEYS - set(state):
        missing = sorted(REQUIRED_KEYS - set(state)) if isinstance(state, dict) else sorted(REQUIRED_KEYS)
        raise CorruptCheckpointError(f"{path} is not a training checkpoint (missing {missing})")
    if not verified:
        log.warning("checkpoint %s has no digest file (written by an older knn-cm); loaded unverified", path)
    return state


def move_aside(path: str | Path) -> Path:
    """Rename a bad checkpoint (and its digest) to ``*.corrupt`` so it is kept but never loaded again.

    A file that is already gone (another process moved it aside first) is no error: the rename is done.
    """
    path = Path(path)
    target = Path(f"{path}{CORRUPT_SUFFIX}")
    for source, moved in ((path, target), (digest_path(path), Path(f"{digest_path(path)}{CORRUPT_SUFFIX}"))):
        try:
            source.replace(moved)
        except FileNotFoundError:
            pass
    return target


def load_latest_intact(run_dir: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that verifies and loads, with its state; None when there is none.

    Corrupt newer ones are moved aside with a warning naming them. Several processes of one run call it through
    one of them only (the trainer's rank 0, which tells the others the path it chose): two callers would race
    to move the same file.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CorruptCheckpointError as error:
            moved = move_aside(path)
            log.warning("%s; moved it aside to %s and trying the previous checkpoint", error, moved)
    return None


def remove_orphan_digests(run_dir: str | Path) -> None:
    """Digest files whose checkpoint never got its final name (a kill between the two renames)."""
    for sidecar in RunLayout(run_dir).checkpoints.glob(f"training-*.pt{DIGEST_SUFFIX}"):
        if not Path(str(sidecar)[: -len(DIGEST_SUFFIX)]).exists():
            sidecar.unlink(missing_ok=True)


def state_is_finite(state: dict) -> bool:
    """True when every floating tensor of a checkpoint's network and EMA is finite."""
    for part in ("model", "ema"):
        for value in _tensors(state.get(part, {})):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return False
    return True


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def newest_finite_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that loads and whose weights are all finite (for the non-finite guard's message)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            if state_is_finite(load_checkpoint(path)):
                return path
        except CorruptCheckpointError:
            continue
    return None


def refuse_restart_over_checkpoints(run_dir: str | Path, resume: str) -> None:
    """trainer.resume=never on a folder with checkpoints would mix two runs' checkpoints: refuse it."""
    existing = list_checkpoints(run_dir)
    if resume == "never" and existing:
        raise ValueError(f"trainer.resume=never, but run folder {run_dir} already has checkpoints (newest "
                         f"{existing[-1].name}); nothing was overwritten. Start the new run in its own folder "
                         f"(run_name=NEW_NAME), or continue this one with trainer.resume=auto")
