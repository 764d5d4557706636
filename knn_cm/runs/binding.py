"""A run folder belongs to one run: one config, one dataset, one process at a time.

- **Binding.** ``run.json`` holds a canonical digest of the resolved config (without :data:`VOLATILE_KEYS`, the
  settings that may change between invocations of the same run) and the dataset fingerprint. A launch with
  another config or dataset stops before writing anything, naming each differing key with both values.
- **Lock.** ``.lock`` is held with ``flock`` for the whole invocation (the kernel releases it when the holder
  dies, also on ``kill -9``); a second launch fails at once naming the holder's PID and host.
- **Invocations.** ``invocations.jsonl`` records each invocation's wall-clock time (updated as it trains), so
  the reported training hours count every invocation, replayed steps included.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from knn_cm.io import atomic_path, remove_stale_temp_files
from knn_cm.runs.checkpoints import refuse_restart_over_checkpoints, remove_orphan_digests
from knn_cm.runs.layout import RunLayout

log = logging.getLogger(__name__)

# Keys that may change between invocations of the same run: where it runs and how it is driven, never what
# it computes. Everything else (lr, k, seed, dataset, model, schedule, ...) binds the folder.
VOLATILE_KEYS = (
    "run_name", "output_root", "accept_config_change",  # where the folder is, and this very switch
    "trainer.resume", "trainer.stop_after_steps",  # how this invocation starts and ends
    "trainer.progress", "trainer.device", "trainer.preemption_signals",  # how it runs (device: same maths)
    "trainer.micro_batch_size",  # accumulation gives the same step (tests/unit/training/test_training.py)
    "trainer.keep_checkpoints", "logger",  # bookkeeping
    "distributed",  # process-group timeout and CPU threads: how ranks meet, not what they compute
)
# Keys configs once had and no longer have, left out when a folder's record is compared, so a folder bound with
# them resumes: Hydra's instantiation keys of the estimator and index groups, which named the code that built
# them before knn_cm/estimators/factory.py did; they never said what a run computes.
RETIRED_KEYS = ("estimator._target_", "estimator._partial_", "index._target_", "index._partial_")


def shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute (for messages)."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class RunFolderError(RuntimeError):
    """The run folder refuses this launch (another config, another process, or a request that would destroy data)."""


def flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, Mapping) and value else {name: value})
    return flat


def identity(config: Mapping, volatile_keys=VOLATILE_KEYS) -> dict:
    """The config without its volatile keys, flattened: what binds a run folder."""
    return {key: value for key, value in sorted(flatten(config).items())
            if not any(key == v or key.startswith(v + ".") for v in volatile_keys)}


# ``_target_`` values of configs bound by an older knn-cm that name code which has moved since.
RENAMED_TARGETS = {"knn_cm.index.build_index": "knn_cm.search.build_index"}


def upgrade_identity(identity_items: Mapping) -> dict:
    """A folder's recorded identity in today's terms: :data:`RETIRED_KEYS` left out, :data:`RENAMED_TARGETS`
    renamed (so a folder bound before a move resumes under the same command)."""
    return {key: RENAMED_TARGETS.get(value, value) if key.endswith("._target_") and isinstance(value, str) else value
            for key, value in identity_items.items() if key not in RETIRED_KEYS}


def digest(identity_items: Mapping) -> str:
    canonical = json.dumps(identity_items, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def differences(old: Mapping, new: Mapping) -> list[str]:
    """``key: old -> new`` lines for every key whose value differs (or exists on one side only)."""
    missing = "(not set)"
    return [f"{key}: {old.get(key, missing)!r} (run) -> {new.get(key, missing)!r} (this launch)"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


class RunFolder:
    """The run folder of a training run (rank 0's view; other DDP ranks share rank 0's lock).

    Args:
        path: the folder (created when missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_handle = None

    # ---------------------------------------------------------------------------------------- lock
    def acquire(self) -> None:
        """Hold the folder's lock until :meth:`release` or the process ends; fail at once if another holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(RunLayout(self.path).lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            error = RunFolderError(f"run folder {shown(self.path)} is in use by another process ({holder}); "
                                   f"nothing was written")
            error.add_note("one process trains a run at a time: wait for it to finish or stop it, or give this "
                           "launch its own folder with run_name=NEW_NAME")
            raise error from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock_handle = handle

    def release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the descriptor releases the flock
            self._lock_handle = None

    # ------------------------------------------------------------------------------------- binding
    def check_config(self, config: Mapping, accept_change: bool = False, legacy_config: Mapping | None = None,
                     deferred: tuple[str, ...] = ()) -> None:
        """Raise :class:`RunFolderError` when this folder was trained with another config, before the data are
        read (the dataset's fingerprint is checked by :meth:`check_binding`). Keys in ``deferred`` (settings
        fitted to the dataset, whose value is known once it is loaded) are left to :meth:`check_binding`."""
        record = self._record(legacy_config)
        if record is None or accept_change:
            return
        skip = lambda key: any(key == name or key.startswith(name + ".") for name in deferred)
        old = {key: value for key, value in upgrade_identity(record["identity"]).items() if not skip(key)}
        new = {key: value for key, value in identity(config).items() if not skip(key)}
        changed = differences(old, new)
        if changed:
            raise self._refusal(changed)

    def check_binding(self, config: Mapping, dataset_fingerprint: str, accept_change: bool = False,
                      legacy_config: Mapping | None = None) -> dict | None:
        """Raise :class:`RunFolderError` when this folder was trained with another config or dataset.

        Args:
            config: this launch's resolved config (a plain mapping).
            dataset_fingerprint: the training store's content fingerprint.
            accept_change: continue under a changed config on purpose (the change is recorded in run.json).
            legacy_config: the folder's config.yaml when it predates run.json (compared instead).
        Returns the record to write with :meth:`write_binding` (None when nothing changes).
        """
        new = identity(config)
        current = {"identity": new, "config_digest": digest(new), "dataset_fingerprint": dataset_fingerprint,
                   "volatile_keys": list(VOLATILE_KEYS)}
        record = self._record(legacy_config)
        if record is None:
            return current | {"created": time.time(), "history": []}
        changed = differences(upgrade_identity(record["identity"]), new)
        if record.get("dataset_fingerprint") not in (None, dataset_fingerprint):
            changed.append(f"dataset fingerprint: {record['dataset_fingerprint']} (run) -> {dataset_fingerprint} "
                           f"(this launch: the training data differ)")
        recorded = RunLayout(self.path).binding.exists()
        if not changed:
            return None if recorded else record | current | {"created": time.time()}
        if not accept_change:
            raise self._refusal(changed)
        log.warning("continuing %s under a changed config (accept_config_change=true):\n  %s", self.path,
                    "\n  ".join(changed))
        history = record.get("history", []) + [{"time": time.time(), "changes": changed}]
        return record | current | {"history": history}

    def _record(self, legacy_config: Mapping | None) -> dict | None:
        """The folder's binding record: run.json, else one made from a legacy config.yaml, else None (unbound)."""
        record_path = RunLayout(self.path).binding
        if record_path.exists():
            return json.loads(record_path.read_text())
        if legacy_config is not None:
            return {"identity": identity(legacy_config), "dataset_fingerprint": None, "history": []}
        return None

    def _refusal(self, changed: list[str]) -> RunFolderError:
        """The refusal of a launch whose config or data differ from the folder's: a first line, each difference
        on an indented line of its own, and the ways forward (also its note, the command line's hint)."""
        listing = "\n  ".join(changed)
        ways = ("give this launch its own folder with run_name=NEW_NAME, or continue this run under the new config "
                "on purpose with accept_config_change=true (recorded in run.json)")
        error = RunFolderError(
            f"run folder {shown(self.path)} belongs to a run with another config; nothing was written. This launch "
            f"differs in:\n  {listing}\nTo go on, {ways}. Settings that may change freely: "
            f"{', '.join(VOLATILE_KEYS)}.")
        error.add_note(ways)
        return error

    def write_binding(self, record: dict | None) -> None:
        if record is not None:
            with atomic_path(RunLayout(self.path).binding) as temp:
                temp.write_text(json.dumps(record, indent=1, default=str) + "\n")

    # --------------------------------------------------------------------------------- invocations
    def start_invocation(self, details: Mapping) -> Invocation:
        return Invocation(RunLayout(self.path).invocations, details)

    # ------------------------------------------------------------------------ the launch's protocol
    def claim(self, config: Mapping, accept_change: bool, resume: str, deferred: tuple[str, ...] = ()) -> None:
        """Rank 0, before the data load (cheap refusals first): take the folder's lock (held until
        :meth:`release`), check that the folder belongs to ``config`` (keys in ``deferred`` are checked by
        :meth:`bind` once the data fix them) and refuse ``resume=never`` over its checkpoints.

        Args:
            config: this launch's resolved config (a plain mapping).
            accept_change: continue under a changed config on purpose (``accept_config_change``).
            resume: ``trainer.resume``.
        """
        self.acquire()
        self.check_config(config, accept_change, legacy_config=self.legacy_config(), deferred=deferred)
        refuse_restart_over_checkpoints(self.path, resume)

    def bind(self, config: Mapping, config_yaml: str, dataset_fingerprint: str, accept_change: bool,
             invocation: Mapping) -> Invocation:
        """Rank 0, after the data load: check the config and the dataset against the folder, then write run.json
        and config.yaml (atomically), remove what a process killed while writing left, and start this
        invocation's record (``invocation``: its details, e.g. overrides and world size)."""
        binding = self.check_binding(config, dataset_fingerprint, accept_change, legacy_config=self.legacy_config())
        self.write_binding(binding)
        with atomic_path(RunLayout(self.path).config) as temp:
            temp.write_text(config_yaml)
        for stale in remove_stale_temp_files(self.path):
            log.warning("removed %s, left by a process killed while writing it", stale)
        remove_orphan_digests(self.path)
        return self.start_invocation(invocation)

    def legacy_config(self) -> dict | None:
        """config.yaml of a folder written before run.json existed (its binding is checked against it)."""
        layout = RunLayout(self.path)
        if layout.binding.exists() or not layout.config.exists():
            return None
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(layout.config), resolve=False)


class Invocation:
    """One launch's wall-clock record in ``invocations.jsonl``: a line per update, the newest line per id counts."""

    def __init__(self, path: Path, details: Mapping):
        self.path = path
        self.started = time.time()
        self.record = {"id": f"{os.getpid()}-{int(self.started * 1000)}", "host": socket.gethostname(),
                       "pid": os.getpid(), "started": self.started, **details}

    def update(self, **values) -> None:
        self.record.update(values, seconds=time.time() - self.started)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(self.record, default=str) + "\n")


def invocation_seconds(run_dir: str | Path) -> float | None:
    """Total wall-clock seconds of every invocation of a run (None when the folder has no invocation record)."""
    path = RunLayout(run_dir).invocations
    if not path.exists():
        return None
    newest: dict[str, float] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            newest[record["id"]] = max(newest.get(record["id"], 0.0), float(record["seconds"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return sum(newest.values())
