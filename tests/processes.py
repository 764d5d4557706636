"""Running a real process from a test: its output, and its whole process group killed on the way out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def run_process(command: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of ``command`` from ``cwd`` in a new session; its process group is killed on
    the way out, whatever happens (status None: it ran past ``timeout``)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test's process group rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_checkout(destination: Path) -> None:
    """The checkout's files as git sees them (tracked, and new ones it does not ignore; outside git, every file but
    outputs), and its .venv linked in."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=CHECKOUT,
                            capture_output=True)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (CHECKOUT / name).is_file():
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(CHECKOUT / name, destination / name)
    else:
        shutil.copytree(CHECKOUT, destination, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns(".venv", "outputs", "multirun", ".git", "__pycache__"))
    (destination / ".venv").symlink_to(CHECKOUT / ".venv")
