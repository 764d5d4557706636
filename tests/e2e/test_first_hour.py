"""The first hour, as a newcomer meets it: the real apps run as processes with tiny settings.

- Bad settings are refused before anything is written: the message's first line names the full key, the value
  and what is allowed, at most one hint follows, the exit status is 1, no traceback, and no folder is left
  (no config.yaml / run.json, no timestamped output folder, no sweep folder). A sweep checks every job first.
- Commands say what they made and what comes next (train.py's summary, a sweep's table, evaluate.py's table).
- Commands take what the files already say (the network's dataset, the digits feature extractor) and refuse an
  experiment of another app with the right command.

The refusals run concurrently (each in its own working directory and TMPDIR); each test then reads its result.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from knn_cm.cli import APPS, CONFIGS
from knn_cm.models import EDMPrecond, SongUNet, save_network
from tests.processes import run_process

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["debug=default"]  # any experiment, two CPU steps on digits with a tiny network


def run_app(app: str, *args: str, cwd: Path, env: dict | None = None,
            timeout: float = 300) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of ``python <app> args`` from ``cwd`` (tests.processes.run_process)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("HYDRA_FULL_ERROR", "KNN_CM_SHORT_ERRORS")}
    environment |= {"OMP_NUM_THREADS": "1", "TMPDIR": str(cwd / "tmp"),
                    # torch's compile cache, which torch >= 2.14 creates when torch._dynamo is imported: not the app's
                    "TORCHINDUCTOR_CACHE_DIR": str(cwd.parent / f"{cwd.name}-torchinductor"), **(env or {})}
    (cwd / "tmp").mkdir(parents=True, exist_ok=True)
    return run_process([sys.executable, str(ROOT / app), *args], cwd, environment, timeout)


def written(cwd: Path) -> list[str]:
    """Everything under ``cwd`` but the empty TMPDIR the test made (the inputs live elsewhere)."""
    return sorted(str(path.relative_to(cwd)) for path in cwd.rglob("*") if path != cwd / "tmp")


def tiny_network(path: Path, channels: int = 1, metadata: dict | None = None) -> Path:
    torch.manual_seed(0)
    network = EDMPrecond(SongUNet(img_resolution=8, in_channels=channels, out_channels=channels, model_channels=8,
                                  channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]))
    return save_network(path, network, metadata=metadata)


# (app, arguments, the error line's start, the hint line's start or None); {network}: a tiny EDM network file.
REFUSALS = {
    "train estimator.k=0": (
        "train.py", [*TRAIN, "estimator.k=0"], "error: estimator.k must be an integer >= 1, got 0", None),
    "train estimator.k=abc": (
        "train.py", [*TRAIN, "estimator.k=abc"], "error: estimator.k must be an integer >= 1, got 'abc'", None),
    "train index.nlist beyond N": (
        "train.py", [*TRAIN, "index=ivf", "index.nlist=5000"],
        "error: index.nlist=5000 exceeds the dataset size N=1797", None),
    "train typed setting": (
        "train.py", [*TRAIN, "trainer.max_steps=abc"],
        "error: trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer", None),
    "train sweep": (
        "train.py", ["-m", *TRAIN, "estimator.k=16,-5"],
        "error: job estimator.k=-5: estimator.k must be an integer >= 1, got -5",
        "hint: 1 of 2 jobs refused; no job was started"),
    "train experiment of evaluate.py": (
        "train.py", ["experiment=tswitch_digits"],
        "error: experiment=tswitch_digits is an experiment of evaluate.py (configs/evaluate/experiment/), "
        "not of train.py",
        "hint: python evaluate.py experiment=tswitch_digits"),
    "evaluate experiment of train.py": (
        "evaluate.py", ["experiment=ict_knn"],
        "error: experiment=ict_knn is an experiment of train.py (configs/train/experiment/), not of evaluate.py",
        "hint: python train.py experiment=ict_knn"),
    "evaluate unknown experiment": (
        "evaluate.py", ["experiment=nosuch"], "error: In 'evaluate': Could not find 'experiment/nosuch'",
        "hint: available: tswitch_digits, tswitch_sweep"),  # only its own experiments, not train.py's
    "sample alone": (
        "sample.py", [], "error: the 'heun' sampler needs network=PATH (a training run folder or a network file)",
        "hint: python sample.py network=outputs/train/quickstart, or sampler.kind=pf_ode to sample with the KNN "
        "estimator alone"),
    "sample text file as network": (
        "sample.py", [f"network={ROOT / 'README.md'}"],
        f"error: not a knn-cm network file: {ROOT / 'README.md'} (it is a text file starting", None),
    "sample missing network": (
        "sample.py", ["network=/nonexistent/network.pt"],
        "error: network /nonexistent/network.pt does not exist (expected a network file or a run folder)", None),
    "sample empty sigmas": (
        "sample.py", ["network={network}", "sampler.kind=consistency", "sampler.sigmas=[]"],
        "error: sampler.sigmas must hold at least one noise level, e.g. (80.0,) or (80.0, 0.821)", None),
    "study empty times": (
        "evaluate_estimators.py", ["study.times=[]"],
        "error: study.times must be a non-empty list of noise levels > 0, got []", None),
    "evaluate missing run folder": (
        "evaluate.py", ["run_dir=/nonexistent/run"],
        "error: run_dir=/nonexistent/run is not a folder (/nonexistent/run does not exist)", None),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    """id -> (exit status, stdout, stderr, the command's working directory), all run at once."""
    network = tiny_network(tmp_path_factory.mktemp("inputs") / "edm.pt")
    folders = {case: tmp_path_factory.mktemp("refusal") for case in REFUSALS}

    def refuse(case):
        app, args, _, _ = REFUSALS[case]
        arguments = [arg.format(network=network) for arg in args]
        return (*run_app(app, *arguments, cwd=folders[case], timeout=150), folders[case])

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(REFUSALS, pool.map(refuse, REFUSALS)))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_is_one_line_naming_the_setting_and_writes_nothing(refusals, case):
    status, _, stderr, cwd = refusals[case]
    _, _, error, hint = REFUSALS[case]
    lines = stderr.splitlines()
    assert status == 1, stderr
    assert lines and lines[0].startswith(error), stderr
    assert len(lines) == (2 if hint else 1), stderr  # one hint at most, no traceback, no Hydra banner
    assert hint is None or lines[1].startswith(hint), stderr
    assert written(cwd) == []  # no run folder, config.yaml, run.json, output or sweep folder
    assert list((cwd / "tmp").iterdir()) == []  # debug=default's run folders live under TMPDIR


def _listed(help_text: str, group: str) -> set[str]:
    """The options ``--help`` lists for ``group`` ("experiment: a, b, c")."""
    line = next((line for line in help_text.splitlines() if line.startswith(f"{group}: ")), f"{group}: ")
    return {name.strip() for name in line.split(":", 1)[1].split(",") if name.strip()}


def test_each_apps_help_lists_only_its_own_experiments_and_groups(tmp_path):
    """train.py's --help lists its training experiments and the groups it composes; evaluate.py's only its
    t_switch sweeps; the estimator study only its figures; sample.py no experiment at all."""
    own = {folder: {path.stem for path in (CONFIGS / folder / "experiment").glob("*.yaml")} for folder in APPS.values()}
    helps = {app: run_app(app, "--help", cwd=tmp_path) for app in APPS}
    assert all(status == 0 for status, _, _ in helps.values()), helps
    text = {app: stdout for app, (_, stdout, _) in helps.items()}
    assert _listed(text["train.py"], "experiment") == own["train"] and "quickstart" in own["train"]
    assert _listed(text["evaluate.py"], "experiment") == own["evaluate"] == {"tswitch_digits", "tswitch_sweep"}
    assert _listed(text["evaluate_estimators.py"], "experiment") == own["estimator_study"] and "figure3" in own[
        "estimator_study"]
    assert _listed(text["sample.py"], "experiment") == set() and own["sample"] == set()
    assert _listed(text["train.py"], "model") and not _listed(text["evaluate.py"], "model")  # train.py's groups
    assert all(_listed(text[app], "dataset") >= {"digits", "cifar10_jpeg"} for app in APPS)  # configs/common


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    status, _, stderr = run_app("sample.py", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert status == 1 and "Traceback (most recent call last)" in stderr
    assert "ValueError: the 'heun' sampler needs network=PATH" in stderr


def test_a_sweep_ends_with_a_table_of_its_jobs(tmp_path):
    """Both jobs pass the settings check (the dataset's size is known only in the job) and fail in their job:
    the table names each folder and its outcome, and neither folder is left behind."""
    status, stdout, stderr = run_app("train.py", "-m", *TRAIN, "run_name=s", "index=ivf", "index.nlist=5000,4000",
                                     cwd=tmp_path)
    assert status == 1
    assert "sweep: 0 of 2 jobs completed" in stdout
    assert "multirun/train/s/index.nlist=5000  failed: index.nlist=5000 exceeds the dataset size N=1797" in stdout
    assert "multirun/train/s/index.nlist=4000  failed: index.nlist=4000 exceeds the dataset size N=1797" in stdout
    assert stderr.splitlines() == ["error: 2 of 2 jobs failed; the first, multirun/train/s/index.nlist=5000: "
                                   "index.nlist=5000 exceeds the dataset size N=1797"]
    assert sorted(p.name for p in (tmp_path / "multirun" / "train" / "s").iterdir()) == ["multirun.yaml"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """A corrected command after a refusal, then stop_after_steps twice (stopped, finished), then once more."""
    cwd = tmp_path_factory.mktemp("train")
    command = [*TRAIN, "output_root=outputs/train", "run_name=first", "trainer.stop_after_steps=1"]
    refused = run_app("train.py", *command, "estimator.k=0", cwd=cwd)
    results = [run_app("train.py", *command, cwd=cwd) for _ in range(3)]
    return cwd, [refused, *results]


def test_the_corrected_command_trains_and_each_launch_says_where_the_run_stands(trained):
    cwd, (refused, stopped, finished, again) = trained
    run = "outputs/train/first"
    assert refused[0] == 1 and refused[2].startswith("error: estimator.k must be an integer >= 1, got 0")
    assert stopped[0] == 0, stopped[2][-2000:]
    assert "stopped at step 1 of 2; the same command continues" in stopped[1]
    assert finished[0] == 0, finished[2][-2000:]
    summary = finished[1][finished[1].index("finished: step 2 of 2"):].splitlines()
    assert summary[1:] == [f"  run folder:      {run}",
                           f"  newest snapshot: {run}/snapshots/network-000000002.pt",
                           summary[3],  # the last loss, a number
                           f"  sample:          python sample.py network={run} sampler.sigmas=[80,0.821]",
                           f"  evaluate:        python evaluate.py run_dir={run} num_samples=2000"]
    assert summary[3].startswith("  last loss:       ") and summary[3].endswith("(step 2)")
    assert again[0] == 0 and "this run had already finished (step 2 of 2); nothing to train" in again[1]
    assert (cwd / run / "config.yaml").is_file()


def test_evaluate_scores_a_digits_run_in_digits_features_and_says_where_the_table_is(trained):
    cwd, _ = trained
    status, stdout, stderr = run_app("evaluate.py", "run_dir=outputs/train/first", "num_samples=20", "batch_size=20",
                                     "metrics.isc=false", "progress=false", cwd=cwd)
    assert status == 0, stderr[-2000:]
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("evaluated 1 snapshot(s)"))
    assert "(20 samples each, consistency sampler, digits features)" in lines[start]
    assert lines[start + 1].split() == ["step", "FID", "IS", "memorised"]
    assert lines[start + 2].split()[0] == "2" and lines[start + 3].startswith("best: step 2, FID ")
    assert lines[start + 4] == "table: outputs/train/first/evaluation.csv"
    assert (cwd / "outputs" / "train" / "first" / "evaluation.csv").is_file()
    assert not (cwd / "outputs" / "evaluate").exists()  # no timestamped folder holding only a log


def test_sample_takes_the_dataset_from_the_network_file(tmp_path):
    """A 3-channel network trained on an array file: sample.py needs no dataset= (it used to sample digits'
    1x8x8 shape and fail)."""
    images = np.random.default_rng(0).integers(0, 256, size=(6, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    store = {"_target_": "knn_cm.data.load_array", "path": str(tmp_path / "images.npy"), "key": None,
             "xflip": False, "name": "tiny-rgb"}
    network = tiny_network(tmp_path / "rgb.pt", channels=3,
                           metadata={"config": yaml.safe_dump({"dataset": {"name": "array", "store": store}})})
    cwd = tmp_path / "work"
    cwd.mkdir()
    status, stdout, stderr = run_app("sample.py", f"network={network}", "num_samples=2", "sampler.num_steps=2",
                                     "hydra.run.dir=out", cwd=cwd)
    assert status == 0, stderr[-2000:]
    assert np.load(cwd / "out" / "samples.npz")["images"].shape == (2, 3, 8, 8)
    assert f"2 samples of tiny-rgb with the 'heun' sampler in {cwd / 'out'}: samples.npz, grid.png" in stdout
    assert yaml.safe_load((cwd / "out" / "config.yaml").read_text())["dataset"]["taken_from"] == str(network)
