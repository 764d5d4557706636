"""Durable atomic writes: a temporary file beside the target, fsync'd, renamed onto it, the folder fsync'd.

A reader sees the old file or the complete new one, never a torn one, and after the call returns the new
file survives a power loss. (``knn_cm.io.atomic_path`` renames without fsync; this is the variant for
files that are expensive to recompute or that others read back: network files, FID statistics, decoded
datasets.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to the disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_folder(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be opened."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextlib.contextmanager
def durable_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(temp_name, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(temp_name)
        fsync_file(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    fsync_folder(path.parent)
