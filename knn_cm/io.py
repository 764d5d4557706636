"""File-system helpers shared by caches, checkpoints and results: the cache folder and atomic writes."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import shutil
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
def atomic_path(path: str | os.PathLike, sync_folder: bool = True):
    """Yield a temporary path beside ``path``; on success make it ``path``, durably and atomically.

    The temporary file is fsync'd before the rename and the folder after it, so after a crash (or a power
    loss) readers find the old file or the complete new one, never a half-written or empty one. A failed
    write removes its temporary file; a full disk raises ``OSError(ENOSPC)`` naming ``path``.
    ``sync_folder=False`` leaves the folder's fsync to a later rename into the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(handle)
    os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(temp_name)
        fsync_path(temp_name)
        os.replace(temp_name, path)
        if sync_folder:
            fsync_path(path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        if not isinstance(error, OSError) and out_of_space(path.parent):
            # torch.save reports a full disk as "basic_ios::clear: iostream error" (a RuntimeError)
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} ({error}); the previous "
                                        f"version of the file, if any, is intact") from error
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}; the previous version "
                                        f"of the file, if any, is intact") from error
        raise


TEMP_SUFFIX = ".tmp"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by path (folders: so that a rename into them survives a crash)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def out_of_space(folder: str | os.PathLike, margin_bytes: int = 1 << 20) -> bool:
    """True when the file system of ``folder`` has less than ``margin_bytes`` free."""
    try:
        return shutil.disk_usage(folder).free < margin_bytes
    except OSError:
        return False


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` left in ``folder`` (and below) when a process was
    killed mid-write. Call only while no other process writes there (the run folder's lock)."""
    removed = []
    for temp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if temp.is_file():
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


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
