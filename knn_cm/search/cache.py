"""The on-disk index cache: trained faiss indexes and projections, keyed by data and spec, built under a lock.

An entry is written atomically and verified on load (fingerprint, spec, size, file digests); one that does not
match is rebuilt, never used. Of the processes that want an entry at once (the ranks of a node, jobs sharing
the cache) the first builds it under the entry's file lock and the others wait and then load it.

A wait for the lock ends after ``KNN_CM_INDEX_LOCK_TIMEOUT`` seconds (default :data:`DEFAULT_LOCK_TIMEOUT`) with
an error naming the lock file. Some shared file systems keep locks on the node that takes them (NFS mounted
``nolock`` or ``local_lock=flock|all``, Lustre ``localflock``, BeeGFS unless its client sets
``tuneUseGlobalFileLocks``): processes on other nodes then do not wait but build the entry too. The writes stay
atomic, so the entry stays whole; the work is repeated. Such mounts are read from ``/proc/mounts`` and warned of.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

import torch

from knn_cm.io import atomic_path, file_digest
from knn_cm.search.faiss_index import faiss_module
from knn_cm.search.spec import IndexSpec
from knn_cm.search.two_stage import Projection

log = logging.getLogger(__name__)
PROJECTION_SAMPLE = 16384  # elements the PCA of projected searches is fitted on
# Long enough for the largest build a waiting process sits out (an IVF index over 1.28M images of 12,288 values
# takes tens of minutes); a lock held longer is more likely left by a process that is gone.
DEFAULT_LOCK_TIMEOUT = 4 * 3600.0
LOCK_TIMEOUT_VARIABLE = "KNN_CM_INDEX_LOCK_TIMEOUT"
_LOCK_POLL_SECONDS = 0.5
_warned_folders: set[str] = set()


def verified_meta(meta_path: Path, expected: dict, digests: dict[str, Path], what: str) -> dict | None:
    """A cache entry's metadata when it holds ``expected`` and each ``digests`` key (e.g. "digest") matches its
    file's digest; else None, with one warning naming ``what`` (the entry is then rebuilt)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable %s metadata %s (%s); rebuilding", what, meta_path, error)
        return None
    if any(meta.get(key) != value for key, value in expected.items()) or \
            any(meta.get(key) != file_digest(path) for key, path in digests.items()):
        log.warning("cached %s %s does not match its data or spec; rebuilding", what, meta_path.parent)
        return None
    return meta


def _metadata(store, spec: IndexSpec) -> dict:
    """What a cache entry must have been built from: the data and the build spec (search settings left out)."""
    build_spec = dataclasses.replace(spec, nprobe=None, rerank=None, precision="float32")
    meta = {"fingerprint": store.fingerprint, "spec": dataclasses.asdict(build_spec), "size": len(store),
            "dim": store.dim}
    if spec.project_dim is not None:
        meta["projection_sample"] = PROJECTION_SAMPLE
    return meta


class CacheEntry:
    """One cached index in the cache folder: ``<base>.faiss`` (the CPU faiss index, when there is one),
    ``<base>.projection.pt`` (a projected search's PCA), ``<base>.json`` (what they were built from and their
    digests, written last: an entry without it is incomplete) and ``<base>.lock`` (held while building)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.index_path = self._file(".faiss")
        self.projection_path = self._file(".projection.pt")
        self.meta_path = self._file(".json")
        self.lock_path = self._file(".lock")

    def _file(self, suffix: str) -> Path:
        return self.base.with_name(self.base.name + suffix)

    def load_or_build(self, store, spec: IndexSpec, build, with_index: bool = True):
        """(CPU faiss index or None, Projection or None): loaded when cached and valid, else ``build()`` and saved.

        Under the entry's lock, so that concurrent callers build it once and the others load it.
        """
        with self.lock():
            cached = self.load(store, spec, with_index)
            if cached is not None:
                return cached
            cpu_index, projection = build()
            self.save(cpu_index, projection, store, spec)
            return cpu_index, projection

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None):
        """Hold the entry's file lock (``flock``: released by the kernel when the holder dies, also on kill -9).

        Waits, logging who holds it, while another process builds the entry, for at most ``timeout`` seconds
        (None: ``KNN_CM_INDEX_LOCK_TIMEOUT``, else :data:`DEFAULT_LOCK_TIMEOUT`); then a ``TimeoutError`` names
        the lock file, its holder and what to do. On a file system without locks (some network mounts) it warns
        and goes on unlocked: each process then builds, and the atomic writes keep the entry whole.
        """
        timeout = lock_timeout() if timeout is None else timeout
        self.base.parent.mkdir(parents=True, exist_ok=True)
        warn_if_locks_are_node_local(self.base.parent)
        with open(self.lock_path, "a+") as handle:
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    log.info("index cache %s is being built by %s: waiting for it", self.base.name, holder)
                    self._wait_for_lock(handle, holder, timeout)
            except OSError as error:
                if isinstance(error, TimeoutError):
                    raise
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("cannot lock %s (%s): building without the lock", self.lock_path, error)
                yield
                return
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield  # closing the handle releases the lock

    def _wait_for_lock(self, handle, holder: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(_LOCK_POLL_SECONDS, left))
        raise TimeoutError(
            f"index cache lock {self.lock_path} is still held by {holder} after {timeout:g} s: if that process "
            f"is still building the index, wait longer ({LOCK_TIMEOUT_VARIABLE}=SECONDS); if it is gone (its job "
            f"ended, its node died: a network file system can keep a dead node's lock), delete {self.lock_path} "
            f"and start again")

    def save(self, cpu_index, projection, store, spec: IndexSpec) -> None:
        meta = _metadata(store, spec)
        if cpu_index is not None:
            faiss = faiss_module()
            with atomic_path(self.index_path) as temp:
                faiss.write_index(cpu_index, str(temp))
                meta |= {"digest": file_digest(temp), "faiss_version": faiss.__version__}
        if projection is not None:
            with atomic_path(self.projection_path) as temp:
                torch.save({"mean": projection.mean.cpu(), "basis": projection.basis.cpu()}, temp)
                meta["projection_digest"] = file_digest(temp)
        with atomic_path(self.meta_path) as temp:
            temp.write_text(json.dumps(meta, indent=1))

    def load(self, store, spec: IndexSpec, with_index: bool = True):
        """(CPU faiss index or None, Projection or None) when the entry exists and verifies, else None."""
        projected = spec.project_dim is not None
        paths = [self.meta_path] + [self.index_path] * with_index + [self.projection_path] * projected
        if not all(path.exists() for path in paths):
            return None
        digests = {"digest": self.index_path} if with_index else {}
        if projected:
            digests["projection_digest"] = self.projection_path
        if verified_meta(self.meta_path, _metadata(store, spec), digests, "index") is None:
            return None
        index = projection = None
        if with_index:
            index = faiss_module().read_index(str(self.index_path))
            dim = store.dim if not projected else spec.project_dim + 1
            if index.ntotal != len(store) or index.d != dim:
                log.warning("cached index %s has the wrong size; rebuilding", self.index_path)
                return None
        if projected:
            saved = torch.load(self.projection_path, map_location="cpu", weights_only=True)
            projection = Projection(saved["mean"], saved["basis"])
        return index, projection


def lock_timeout(environ=None) -> float:
    """Seconds a process waits for an index cache lock: ``KNN_CM_INDEX_LOCK_TIMEOUT``, else the default."""
    environ = os.environ if environ is None else environ
    value = environ.get(LOCK_TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{LOCK_TIMEOUT_VARIABLE} must be a number of seconds > 0, got {value!r}")
    return seconds


# ------------------------------------------------------------------------------------------ node-local locks
def parse_mounts(text: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, options) of each line of ``/proc/mounts``, with the kernel's octal escapes
    (a space is written as backslash 040) decoded."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[1])
            mounts.append((point, fields[2], set(fields[3].split(","))))
    return mounts


def mount_of(path: str | Path, mounts: list[tuple[str, str, set[str]]]) -> tuple[str, str, set[str]] | None:
    """The mount holding ``path`` (the longest mount point above it; the last such line wins, as in the kernel)."""
    path = os.path.abspath(path)
    best = None
    for mount in mounts:
        point = mount[0].rstrip("/") or "/"
        if path == point or path.startswith(point if point.endswith("/") else point + "/"):
            if best is None or len(point) >= len(best[0].rstrip("/") or "/"):
                best = mount
    return best


def node_local_locks(path: str | Path, mounts_text: str | None = None) -> str | None:
    """Why file locks under ``path`` bind only the node that takes them, or None when its mount says nothing so.

    NFS with ``nolock`` or ``local_lock=flock`` / ``all`` keeps ``flock`` locks on the client; Lustre with
    ``localflock`` too; BeeGFS does unless the client's ``tuneUseGlobalFileLocks`` is set (not a mount option, so
    every BeeGFS mount is named). ``mounts_text``: the contents of ``/proc/mounts`` (read when None).
    """
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return None
    mount = mount_of(path, parse_mounts(mounts_text))
    if mount is None:
        return None
    point, fstype, options = mount
    where = f"{point} ({fstype}"
    if fstype.startswith("nfs"):
        local = sorted(option for option in options if option in ("nolock", "local_lock=flock", "local_lock=all"))
        if local:
            return f"{where} mounted {','.join(local)})"
    elif fstype == "lustre" and "localflock" in options:
        return f"{where} mounted localflock)"
    elif fstype.startswith("beegfs"):
        return f"{where}: locks are node-local unless the client sets tuneUseGlobalFileLocks)"
    return None


def warn_if_locks_are_node_local(folder: str | Path) -> None:
    """Warn once per folder when its file system's locks do not reach other nodes."""
    key = os.path.abspath(folder)
    if key in _warned_folders:
        return
    _warned_folders.add(key)
    reason = node_local_locks(folder)
    if reason is not None:
        log.warning("index cache %s is on %s: its file locks are node-local, so processes on other nodes do not "
                    "wait for a build and build the same index too (entries stay whole: writes are atomic). Set "
                    "KNN_CM_CACHE to a folder whose locks are shared (a local disk for one node), or build the index "
                    "once before starting many nodes (docs/slurm.md)", key, reason)
