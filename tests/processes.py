"""Running a real process from a test: its output, and its whole process group killed on the way out."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


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
