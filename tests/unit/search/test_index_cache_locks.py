"""The index cache's lock: a wait that ends with a message, and file systems whose locks stay on one node."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

import knn_cm.search.cache as cache
from knn_cm.search.cache import CacheEntry, lock_timeout, mount_of, node_local_locks, parse_mounts

HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    with open(sys.argv[1], "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(f"PID {os.getpid()} on builder-node\\n")
        handle.flush()
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


@pytest.fixture
def held_lock(tmp_path):
    """An entry whose lock another process holds (for 15 s at most)."""
    entry = CacheEntry(tmp_path / "digits-abc-ivf")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry.lock_path), "15"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield entry, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_wait_for_the_lock_times_out_naming_the_lock_file_and_what_to_do(held_lock, monkeypatch):
    """A lock held by a process that never finishes (or by a dead node on a network file system) was waited for
    without end."""
    entry, holder = held_lock
    monkeypatch.setenv("KNN_CM_INDEX_LOCK_TIMEOUT", "1")
    with pytest.raises(TimeoutError) as raised:
        with entry.lock():
            pass
    message = str(raised.value)
    assert holder.poll() is None, "the lock was taken only because its holder ended"
    assert f"index cache lock {entry.lock_path} is still held by PID {holder.pid} on builder-node after 1 s" in message
    assert "KNN_CM_INDEX_LOCK_TIMEOUT=SECONDS" in message and f"delete {entry.lock_path}" in message
    assert "\n" not in message


def test_the_lock_timeout_setting_is_checked():
    assert lock_timeout({}) == cache.DEFAULT_LOCK_TIMEOUT
    assert lock_timeout({"KNN_CM_INDEX_LOCK_TIMEOUT": "90"}) == 90.0
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ValueError, match=f"KNN_CM_INDEX_LOCK_TIMEOUT must be a number of seconds > 0, got "
                                             f"'{bad}'"):
            lock_timeout({"KNN_CM_INDEX_LOCK_TIMEOUT": bad})


MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
fs1:/export/home /home nfs4 rw,relatime,vers=4.2,rsize=1048576,hard,proto=tcp,local_lock=none,addr=10.0.0.1 0 0
fs2:/scratch /scratch nfs rw,relatime,vers=3,nolock,proto=tcp,local_lock=all,addr=10.0.0.2 0 0
fs3:/proj /proj nfs rw,relatime,vers=3,proto=tcp,local_lock=flock,addr=10.0.0.3 0 0
10.0.0.4@o2ib:/lustre /lustre lustre rw,localflock,lazystatfs 0 0
10.0.0.5@o2ib:/global /global lustre rw,flock,lazystatfs 0 0
beegfs_nodev /mnt/beegfs beegfs rw,relatime,cfgFile=/etc/beegfs/beegfs-client.conf 0 0
fs6:/my\\040data /data\\040set nfs rw,vers=3,nolock,local_lock=all 0 0
"""


def test_mounts_are_parsed_with_their_escapes_and_the_deepest_mount_holds_a_path():
    mounts = parse_mounts(MOUNTS)
    assert ("/data set", "nfs", {"rw", "vers=3", "nolock", "local_lock=all"}) in mounts
    assert mount_of("/home/user/.cache/knn_cm/indexes", mounts)[0] == "/home"
    assert mount_of("/homework", mounts)[0] == "/"
    assert mount_of("/scratch", mounts)[0] == "/scratch"


@pytest.mark.parametrize("folder, reason", [
    ("/scratch/u/cache/indexes", "/scratch (nfs mounted local_lock=all,nolock)"),
    ("/proj/cache", "/proj (nfs mounted local_lock=flock)"),
    ("/lustre/u/cache", "/lustre (lustre mounted localflock)"),
    ("/mnt/beegfs/cache", "/mnt/beegfs (beegfs: locks are node-local unless the client sets "
                          "tuneUseGlobalFileLocks)"),
    ("/data set/cache", "/data set (nfs mounted local_lock=all,nolock)"),
    ("/home/u/.cache/knn_cm", None),  # NFSv4, local_lock=none: locks go to the server
    ("/global/cache", None),  # Lustre with flock: cluster-wide
    ("/tmp/cache", None),  # a local disk
])
def test_file_systems_whose_locks_are_node_local_are_detected(folder, reason):
    assert node_local_locks(folder, MOUNTS) == reason


def test_taking_a_lock_on_such_a_file_system_warns_once(tmp_path, monkeypatch, caplog):
    mounts = f"{MOUNTS}fs7:/shared {tmp_path} nfs rw,vers=3,nolock,local_lock=all 0 0\n"
    monkeypatch.setattr(cache, "node_local_locks", lambda folder: node_local_locks(folder, mounts))
    with caplog.at_level(logging.WARNING, logger="knn_cm.search.cache"):
        for name in ("one", "two"):
            with CacheEntry(tmp_path / "indexes" / name).lock():
                pass
    warnings = [record.getMessage() for record in caplog.records if "node-local" in record.getMessage()]
    assert len(warnings) == 1
    assert f"{tmp_path} (nfs mounted local_lock=all,nolock)" in warnings[0] and "KNN_CM_CACHE" in warnings[0]
