"""Runs a script's parts one by one, each in a child process of its own with a time budget, one JSON line each.

The parent (:class:`Runner`) starts ``python SCRIPT --child PART --result FILE ...`` in a new process group that
dies with it, waits at most the part's budget (and what is left of ``--deadline``), kills the group when the part
runs over or the run is interrupted (SIGTERM, SIGINT, SIGHUP), and prints one flushed JSON line per part (also kept
in ``--jsonl``, rewritten atomically), so a run cut short keeps every line written before the cut. The child writes
its result atomically (:func:`write_json`); a part that reports partial results as it goes keeps them when cut.
scripts/device_check.py is its user.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MIN_PART_SECONDS = 5.0  # with less than this left before --deadline, a part is skipped, not started


def write_json(path: Path, payload: dict) -> None:
    """``payload`` as JSON at ``path``, atomically (a reader sees the old file or the new one, whole)."""
    from knn_cm.io import atomic_path

    with atomic_path(path, sync_folder=False) as temp:
        temp.write_text(json.dumps(payload, default=str))


def third_party_imports(root: Path) -> list[str]:
    """Top-level modules imported so far that are neither the standard library nor this repository's
    (installed packages: anything under a site-packages folder, a virtual environment in the repository too)."""
    names = set()
    for name, module in list(sys.modules.items()):
        if name in sys.stdlib_module_names or name.startswith("_") or "." in name:
            continue
        location = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None)
        if not location:
            continue
        path = Path(location).resolve()
        if not path.is_relative_to(root) or {"site-packages", "dist-packages"} & set(path.parts):
            names.add(name)
    return sorted(names)


class Interrupted(Exception):
    """The runner received SIGTERM / SIGINT / SIGHUP: the running part is cut and reported."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum, frame):
    """A signal handler: the runner's wait ends with :class:`Interrupted`."""
    raise Interrupted(signum)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the runner dies (Linux prctl PR_SET_PDEATHSIG), so a runner
    killed with -9 leaves no part running."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


class Runner:
    """Runs parts one by one in child processes and writes one JSON line per part."""

    def __init__(self, script: Path, budgets: dict, args, env: dict, workdir: Path):
        self.script, self.budgets = Path(script).resolve(), budgets
        self.args = args
        self.env = env
        self.workdir = workdir
        self.lines: list[dict] = []
        self.started = time.monotonic()
        self.interrupted: Interrupted | None = None
        self.preconditions: dict | None = None

    def emit(self, line: dict) -> None:
        """Print the line (flushed) and rewrite the --jsonl file with every line so far (atomically)."""
        self.lines.append(line)
        print(json.dumps(line, default=str), flush=True)
        if self.args.jsonl:
            from knn_cm.io import atomic_path

            with atomic_path(self.args.jsonl) as temp:
                temp.write_text("".join(json.dumps(entry, default=str) + "\n" for entry in self.lines))

    def remaining(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    def run_part(self, name: str) -> dict:
        left = self.remaining()
        budget = min(float(self.args.budget.get(name, self.budgets.get(name, 60))), left)
        line = {"part": name, "device": self.args.device, "quick": self.args.quick}
        if left < MIN_PART_SECONDS:
            line |= {"status": "skipped", "reason": f"no time left under --deadline {self.args.deadline:g} s"}
            self.emit(line)
            return line
        result_file = self.workdir / f"{name}.json"
        command = [sys.executable, str(self.script), "--child", name, "--result", str(result_file),
                   "--device", self.args.device, "--data", self.args.data]
        command += ["--quick"] * self.args.quick + ["--synthetic"] * self.args.synthetic
        print(f"device-check: part {name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=self.script.parents[1], env=self.env, stdout=sys.stderr.fileno(),
                                   stderr=sys.stderr.fileno(), start_new_session=True, preexec_fn=_die_with_parent)
        cut_reason = None
        try:
            process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            cut_reason = f"over its budget of {budget:.0f} s: killed"
        except Interrupted as interrupted:
            cut_reason = f"the check was interrupted ({interrupted}): killed"
            self.interrupted = interrupted
        finally:
            if process.poll() is None:
                _kill_group(process)
        line["seconds"] = round(time.monotonic() - started, 2)
        line["budget_s"] = round(budget, 1)
        payload = _read_json(result_file)
        if cut_reason:
            line |= {"status": "cut", "reason": cut_reason, "partial": payload.get("partial", {})}
        elif payload.get("complete"):
            result = payload["result"]
            status = "skipped" if "not_run" in result else (
                "failed" if not all(result.get("checks", {}).values()) else "ok")
            line |= {"status": status, **result}
        elif "error" in payload:
            line |= {"status": "error", "error": payload["error"], "partial": payload.get("partial", {})}
        else:
            line |= {"status": "error", "error": f"the part's process ended with status {process.returncode} and "
                                                 f"no result", "partial": payload.get("partial", {})}
        for key in ("imports", "torch_threads_at_start", "pid"):
            if key in payload:
                line[key] = payload[key]
        self.emit(line)
        return line

    def summary(self, extra: dict | None = None) -> dict:
        parts = {line["part"]: line["status"] for line in self.lines}
        failed = [name for name, status in parts.items() if status not in ("ok", "skipped")]
        missed = [f"{line['part']}.{target}" for line in self.lines
                  for target, met in (line.get("targets") or {}).items() if not met]
        line = {"part": "summary", "status": "failed" if failed else "ok", "parts": parts, "failed_parts": failed,
                "targets_missed": missed, "seconds": round(time.monotonic() - self.started, 1),
                "preconditions": self.preconditions, **(extra or {})}
        self.emit(line)
        return line


def check_preconditions(bundle: Path, python: str = sys.executable) -> dict:
    """What the check needs before it starts: wheels in ``bundle`` (the offline install's input) and ``python -m
    pip`` (the install's tool). ``missing`` lists, in words, what is not there."""
    wheels = sorted(Path(bundle).glob("*.whl")) if Path(bundle).is_dir() else []
    try:
        probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60)
        pip = probe.stdout.split(" from ")[0].strip() if probe.returncode == 0 else None
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1][:200]
    except (OSError, subprocess.TimeoutExpired) as error:
        pip, why = None, str(error)[:200]
    missing = []
    if not wheels:
        missing.append(f"no wheels in {bundle} (make device-bundle where PyPI is reachable, and carry the folder)")
    if pip is None:
        missing.append(f"{Path(python).name} -m pip does not work ({why})")
    return {"bundle": str(bundle), "wheels": len(wheels), "pip": pip, "missing": missing}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
