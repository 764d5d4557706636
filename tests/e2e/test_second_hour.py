"""The second hour, past the quickstart: the real apps run as processes with tiny settings.

- A refusal says what differs and what to do: a run folder bound to another config lists each differing key (run
  value -> this launch's value) under its first line, says that nothing was written and gives both ways forward;
  the folder's lock and config are checked before the dataset loads.
- A key that does not exist gets the closest real keys as its hint; a library's value error is restated with the
  setting's full key and its allowed range; a folder that cannot be created names the setting that chose it.
- Nothing mixes silently: estimator.k > N (and an IVF index's nprobe > nlist) is stated once and recorded as what
  ran; an image folder holding train/ and test/ needs a subfolder.
- report.py draws no Figure 4 without data and says why.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.e2e.test_first_hour import TRAIN, run_app, written
from tests.processes import run_process

ROOT = Path(__file__).resolve().parents[2]
RUN = "outputs/train/r"  # the run folder the run-folder tests bind, relative to their working directory
BOUND = [*TRAIN, "output_root=outputs/train", "run_name=r"]  # the command that bound it
WAYS_FORWARD = ("hint: give this launch its own folder with run_name=NEW_NAME, or continue this run under the new "
                "config on purpose with accept_config_change=true (recorded in run.json)")
MISSING_DATA = ["dataset=image_folder", "dataset.path=/nonexistent/images"]  # a load that would fail at once
LISTING = "python train.py --cfg job lists every setting"


def split_images(folder: Path) -> Path:
    """An image folder holding train/ and test/ (one class each, 8x8 grey PNGs)."""
    for split in ("train", "test"):
        (folder / split / "zero").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / split / "zero" / f"{i}.png")
    return folder


# (app, arguments, the error line's start, the hint line's start or None); {file}: a regular file, {images}: an
# image folder with train/ and test/.
REFUSALS = {
    "unknown key with a close real key": (
        "train.py", [*TRAIN, "trainer.lr=-1"], "error: trainer.lr is not a setting of train.py",
        f"hint: did you mean trainer.optimizer.lr? ({LISTING})"),
    "unknown key like no real key": (
        "train.py", ["foo=1"], "error: foo is not a setting of train.py",
        f"hint: no setting has a name close to it; {LISTING}"),
    "misspelt group": (
        "train.py", ["experimnt=ict_knn"], "error: experimnt is not a setting of train.py",
        f"hint: did you mean experiment? ({LISTING})"),
    "sample unknown key": (
        "sample.py", ["sampler.sigma=[80]"], "error: sampler.sigma is not a setting of sample.py",
        "hint: did you mean sampler.sigmas"),
    "evaluate unknown key": (
        "evaluate.py", ["num_sample=10"], "error: num_sample is not a setting of evaluate.py",
        "hint: did you mean num_samples?"),
    "negative learning rate": (
        "train.py", [*TRAIN, "trainer.optimizer.lr=-1"], "error: trainer.optimizer.lr must be a number >= 0, got -1",
        None),
    "beta out of range": (
        "train.py", [*TRAIN, "trainer.optimizer.betas=[0.9,1.5]"],
        "error: trainer.optimizer.betas[1] must be a number in [0, 1), got 1.5", None),
    "output_root under a file": (
        "train.py", [*TRAIN, "output_root={file}/runs"],
        "error: output_root={file}/runs: cannot create the output folder {file}/runs/",
        "hint: choose a folder this user can create and write"),
    "sample hydra.run.dir under a file": (
        "sample.py", ["sampler.kind=pf_ode", "hydra.run.dir={file}/out"],
        "error: hydra.run.dir={file}/out: cannot create the output folder {file}/out (Not a directory); nothing "
        "was written", "hint: choose a folder this user can create and write"),
    "image folder with splits": (
        "train.py", [*TRAIN, "dataset=image_folder", "dataset.path={images}", "dataset.resolution=8",
                     "dataset.channels=1"],
        "error: dataset.store: image folder or archive {images} holds the splits test, train; pass "
        "subfolder='train' to read one (dataset.subfolder=train), or subfolder='.' to read them all", None),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "a_file").write_text("not a folder\n")
    return {"file": str(folder / "a_file"), "images": str(split_images(folder / "images"))}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, inputs) -> dict:
    """id -> (exit status, stdout, stderr, the command's working directory), all run at once."""
    folders = {case: tmp_path_factory.mktemp("refusal") for case in REFUSALS}

    def refuse(case):
        app, args, _, _ = REFUSALS[case]
        return (*run_app(app, *(arg.format(**inputs) for arg in args), cwd=folders[case], timeout=150), folders[case])

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(REFUSALS, pool.map(refuse, REFUSALS)))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_names_the_setting_and_what_is_allowed_or_meant_and_writes_nothing(refusals, inputs, case):
    status, _, stderr, cwd = refusals[case]
    _, _, error, hint = REFUSALS[case]
    lines = stderr.splitlines()
    assert status == 1, stderr
    assert lines and lines[0].startswith(error.format(**inputs)), stderr
    assert len(lines) == (2 if hint else 1), stderr  # one hint at most, no traceback
    assert hint is None or lines[1].startswith(hint), stderr
    assert written(cwd) == [] and list((cwd / "tmp").iterdir()) == []


def _folder_state(run: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes, Hydra's job log (which each launch appends to) and the lock's
    holder line (which names whoever holds the lock) aside."""
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file() and path.suffix != ".log" and path.name != ".lock"}


@pytest.fixture(scope="module")
def bound(tmp_path_factory) -> Path:
    """A working directory holding a finished two-step run folder, outputs/train/r."""
    cwd = tmp_path_factory.mktemp("bound")
    status, _, stderr = run_app("train.py", *BOUND, cwd=cwd)
    assert status == 0, stderr[-2000:]
    return cwd


def test_another_config_is_refused_with_each_difference_nothing_written_and_both_ways_forward(bound):
    before = _folder_state(bound / RUN)
    status, _, stderr = run_app("train.py", *BOUND, "trainer.optimizer.lr=1e-3", cwd=bound)
    assert status == 1
    assert stderr.splitlines() == [
        f"error: run folder {RUN} belongs to a run with another config; nothing was written. This launch differs in:",
        "  trainer.optimizer.lr: 0.0005 (run) -> 0.001 (this launch)",
        WAYS_FORWARD], stderr
    assert _folder_state(bound / RUN) == before


def test_the_config_is_refused_before_the_dataset_loads(bound):
    """The launch names a dataset that does not exist: the folder's refusal comes first, listing it."""
    status, _, stderr = run_app("train.py", *BOUND, *MISSING_DATA, cwd=bound)
    lines = stderr.splitlines()
    assert status == 1 and lines[0].startswith(f"error: run folder {RUN} belongs to a run with another config; "
                                               "nothing was written"), stderr
    assert any(line.startswith("  dataset.path: ") and line.endswith(" -> '/nonexistent/images' (this launch)")
               for line in lines), stderr
    assert all(line.startswith("  ") for line in lines[1:-1]) and lines[-1] == WAYS_FORWARD, stderr
    assert "Traceback" not in stderr and "does not exist" not in stderr


def test_a_folder_in_use_is_refused_before_the_dataset_loads(bound):
    before = _folder_state(bound / RUN)
    with open(bound / RUN / ".lock", "a+") as handle:  # another process holding the lock, as the lock's own code
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.seek(0)
        handle.truncate()
        handle.write("PID 4242 on elsewhere since 2026-12-07 10:00:00\n")
        handle.flush()
        status, _, stderr = run_app("train.py", *BOUND, *MISSING_DATA, cwd=bound)
        handle.seek(0)
        assert handle.read() == "PID 4242 on elsewhere since 2026-12-07 10:00:00\n"  # the holder's line stays
    assert _folder_state(bound / RUN) == before
    assert status == 1
    assert stderr.splitlines() == [
        f"error: run folder {RUN} is in use by another process (PID 4242 on elsewhere since 2026-12-07 10:00:00); "
        "nothing was written",
        "hint: one process trains a run at a time: wait for it to finish or stop it, or give this launch its own "
        "folder with run_name=NEW_NAME"], stderr


def test_settings_beyond_their_bounds_are_stated_once_and_recorded_as_what_ran(tmp_path):
    """estimator.k > N searches all N; an IVF index's nprobe beyond its nlist lists probes them all."""
    command = [*TRAIN, "output_root=outputs/train", "run_name=k", "estimator.k=100000", "index=ivf", "index.nlist=16",
               "index.nprobe=64"]
    status, stdout, stderr = run_app("train.py", *command, cwd=tmp_path)
    assert status == 0, stderr[-2000:]
    statements = ["estimator.k=100000 exceeds the dataset size N=1797: the estimator searches all 1797 elements "
                  "(k = N, the exact posterior), and estimator.k=1797 is recorded",
                  "index.nprobe=64 exceeds the index's nlist=16 lists: index.nprobe=16 runs and is recorded"]
    assert all((stdout + stderr).count(statement) == 1 for statement in statements), stdout + stderr
    run = tmp_path / "outputs" / "train" / "k"
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["estimator"]["k"] == 1797 and recorded["index"]["nprobe"] == 16
    identity = json.loads((run / "run.json").read_text())["identity"]
    assert identity["estimator.k"] == 1797 and identity["index.nprobe"] == 16
    status, stdout, stderr = run_app("train.py", *command, cwd=tmp_path)  # the same command, again: the same run
    assert status == 0 and "this run had already finished (step 2 of 2)" in stdout, stderr[-2000:]


def test_report_draws_no_figure4_without_data_and_says_why(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    status, stdout, stderr = run_process([sys.executable, str(ROOT / "scripts" / "report.py")], tmp_path,
                                         environment, 120)
    assert status == 0, stderr[-2000:]
    assert not list((tmp_path / "report").glob("figure4_*.png"))
    sweeps = tmp_path / "multirun" / "train"
    assert f"  figure4_k: not drawn, no sweep folder at {sweeps / 'figure4_k'}" in stdout.splitlines(), stdout
    assert f"  figure4_n: not drawn, no sweep folder at {sweeps / 'figure4_n'}" in stdout.splitlines(), stdout
