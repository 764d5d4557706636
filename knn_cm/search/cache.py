"""The on-disk index cache: trained faiss indexes and projections, keyed by data and spec, built under a lock.

An entry is written atomically and verified on load (fingerprint, spec, size, file digests); one that does not
match is rebuilt, never used. Of the processes that want an entry at once (the ranks of a node, jobs sharing
the cache) the first builds it under the entry's file lock and the others wait and then load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import torch

from knn_cm.io import atomic_path, file_digest
from knn_cm.search.faiss_index import faiss_module
from knn_cm.search.spec import IndexSpec
from knn_cm.search.two_stage import Projection

log = logging.getLogger(__name__)
PROJECTION_SAMPLE = 16384  # elements the PCA of projected searches is fitted on


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
    def lock(self):
        """Hold the entry's file lock (``flock``: released by the kernel when the holder dies, also on kill -9).

        Waits, logging who holds it, while another process builds the entry. On a file system without locks
        (some network mounts) it warns and goes on unlocked: each process then builds, and the atomic writes keep
        the entry whole.
        """
        self.base.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    log.info("index cache %s is being built by %s: waiting for it", self.base.name, holder)
                    fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as error:
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
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable index metadata %s (%s); rebuilding", self.meta_path, error)
            return None
        expected = _metadata(store, spec)
        if (any(meta.get(key) != value for key, value in expected.items())
                or (with_index and meta.get("digest") != file_digest(self.index_path))
                or (projected and meta.get("projection_digest") != file_digest(self.projection_path))):
            log.warning("cached index %s does not match its data or spec; rebuilding", self.base)
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
