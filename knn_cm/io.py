"""File-system helpers shared by caches, checkpoints and results: the cache folder and atomic writes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def cache_dir() -> Path:
    """Folder for derived files (decoded datasets, faiss indexes, feature statistics).

    ``$KNN_CM_CACHE`` when set, else ``~/.cache/knn_cm``. Created on first use.
    """
    path = Path(os.environ.get("KNN_CM_CACHE", Path.home() / ".cache" / "knn_cm")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` atomically.

    Readers never see a half-written file: a crash leaves the old file (or none) and a stray temp
    file that the next write replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_digest(path: str | os.PathLike, chunk_bytes: int = 16 << 20) -> str:
    """blake2b digest of a file's bytes, for verifying caches on load."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_csv_rows(path: str | os.PathLike, fields: Sequence[str], rows: Iterable[Mapping]) -> None:
    """Write ``rows`` (dicts) as a CSV with columns ``fields`` atomically; other keys are left out."""
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=dpi, format="png")
    plt.close(figure)
