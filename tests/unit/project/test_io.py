"""atomic_path's durability protocol, call by call: write, fsync the file, rename, fsync the folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import knn_cm.io as io
from knn_cm.io import atomic_path


@pytest.fixture
def calls(monkeypatch):
    """Record os.fsync (as the path its descriptor was opened for, and the file's bytes then) and os.replace."""
    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def recording_open(path, flags, *args, **kwargs):
        descriptor = real_open(path, flags, *args, **kwargs)
        opened[descriptor] = Path(path)
        return descriptor

    def recording_fsync(descriptor):
        path = opened[descriptor]
        events.append(("fsync", path, path.read_bytes() if path.is_file() else None))
        real_fsync(descriptor)

    def recording_replace(source, target, *args, **kwargs):
        events.append(("replace", Path(source), Path(target)))
        real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(io.os, "open", recording_open)
    monkeypatch.setattr(io.os, "fsync", recording_fsync)
    monkeypatch.setattr(io.os, "replace", recording_replace)
    return events


def test_the_file_is_synced_whole_before_the_rename_and_the_folder_after(tmp_path, calls):
    target = tmp_path / "sub" / "result.json"
    target.parent.mkdir()
    target.write_text("old")
    with atomic_path(target) as temp:
        temp.write_text("new contents")
        calls.append(("written", temp, None))
    assert [event[0] for event in calls] == ["written", "fsync", "replace", "fsync"], calls
    (_, written, _), (_, synced, synced_bytes), (_, source, destination), (_, folder, _) = calls
    assert synced == written == source and synced_bytes == b"new contents", "the temporary file, complete"
    assert destination == target and folder == target.parent, "then renamed, then its folder synced"
    assert target.read_text() == "new contents" and not written.exists()


def test_without_folder_sync_the_file_is_still_synced_before_the_rename(tmp_path, calls):
    target = tmp_path / "result.txt"
    with atomic_path(target, sync_folder=False) as temp:
        temp.write_text("x")
    assert [event[0] for event in calls] == ["fsync", "replace"], calls
    assert calls[0][1] == calls[1][1] and calls[0][2] == b"x" and calls[1][2] == target


def test_a_failed_write_renames_nothing_and_leaves_no_temporary_file(tmp_path, calls):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise ValueError("boom")
    assert not [event for event in calls if event[0] == "replace"]
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.txt"]
