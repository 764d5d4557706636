"""The seeded study's Table 2 and Figure 5 parts on digits: their experiments compose and train, the campaign's
dry-run lists their commands and its cost, the seeded report writes their tables from run folders and says what it
lacks, and the final snapshot's scorings resume over ``<run>/last``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from knn_cm import paper
from knn_cm.cli import compose_app
from knn_cm.runs.layout import RunLayout

from .test_paper import _scores

ROOT = Path(__file__).resolve().parents[3]
STUDY = paper.DIGITS_SEEDS
TABLE2, FIGURE5 = STUDY.part("table2"), STUDY.part("figure5")
NEW_EXPERIMENTS = ("digits_edm_stf", "digits_edm_knn")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("experiment", NEW_EXPERIMENTS)
def test_the_table2_experiments_are_digits_edm_with_another_target(experiment):
    base = OmegaConf.to_container(compose_app("train", ["experiment=digits_edm", "run_name=x"]), resolve=True)
    config = OmegaConf.to_container(compose_app("train", [f"experiment={experiment}", "run_name=x"]), resolve=True)
    assert config.pop("estimator") != base.pop("estimator")
    assert config == base
    debug = compose_app("train", [f"experiment={experiment}", "debug=default", "run_name=x"])
    assert debug.trainer.max_steps == 2 and debug.trainer.objective._target_.endswith("EDMObjective")
    estimator = OmegaConf.to_container(debug.estimator)
    assert estimator == ({"name": "stf", "n": 64, "variant": "per_sample"} if experiment.endswith("stf") else
                         {"name": "knn", "k": 256, "n": 64, "refine_proposal": False})
    assert {method.experiment for sweep in TABLE2.sweeps for method in sweep.methods} >= {experiment}


@pytest.mark.parametrize("experiment", NEW_EXPERIMENTS)
def test_a_debug_run_of_each_table2_experiment_trains(experiment, tmp_path):
    completed = subprocess.run([sys.executable, "train.py", f"experiment={experiment}", "debug=default"], cwd=ROOT,
                               env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)},
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "finished: step 2 of 2" in completed.stdout
    (run,) = (tmp_path / "knn-cm-debug").iterdir()
    assert RunLayout(run).snapshot(2).is_file()


def _dry_run(what: str, **env) -> list[str]:
    base = {key: value for key, value in os.environ.items() if key not in ("STEPS", "SNAPSHOT_EVERY")}
    env = {**base, "PYTHON": sys.executable, "NICE": "nice -n 5", **env}
    result = subprocess.run(["bash", "scripts/digits_seeds.sh", what, "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_dry_run_lists_table2_and_figure5_and_their_cost():
    lines = _dry_run("all")
    prefix = f"nice -n 5 {sys.executable} "
    commands = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
    assert ("train.py -m seed=0,1,2 experiment=digits_edm,digits_edm_stf,digits_edm_knn "
            "'run_name=${hydra:runtime.choices.experiment}_steps${trainer.max_steps}' trainer.max_steps=2000 "
            "trainer.snapshot_every=500 trainer.progress=false") in commands
    run = "multirun/train/digits_edm_knn_steps2000/seed=2"
    scoring = [c for c in commands if c.startswith("evaluate.py") and run in c]
    assert [c.split("progress=false ")[1].split(" 'hydra")[0] for c in scoring] == [
        "sampler.kind=heun sampler.num_steps=18", "sampler.kind=heun sampler.num_steps=4",
        "sampler.kind=heun sampler.num_steps=8"]
    assert f"run_dir='\"'\"'{run}/last'\"'\"'" in scoring[1]
    tswitch = [c for c in commands if "experiment=tswitch_digits" in c]
    assert len(tswitch) == 3 and all("snapshots/network-000002000.pt" in c and "/tswitch'" in c for c in tswitch)
    assert "multirun/train/digits_edm_steps2000/seed=1/snapshots" in tswitch[1]
    # every part's cost on 2 cores, and a total
    assert lines[0].startswith("cost on 2 CPU cores")
    cost = {line.split(":")[0].strip(): line for line in lines[1:7]}
    assert "9 runs x 3-10.5 min training + 9 scorings x 1.5-3.5 min" in cost["table2"]
    assert "3 t_switch sweeps x 4.5-10 min" in cost["figure5"] and "total" in cost
    # the order: Table 1, Figure 4, Table 2, Figure 5
    trains = [i for i, c in enumerate(commands) if c.startswith("train.py")]
    assert len(trains) == 4 and trains[-1] < commands.index(tswitch[0])


def test_the_dry_run_of_one_part_scales_its_cost_to_steps():
    lines = _dry_run("table2", STEPS="500", SNAPSHOT_EVERY="250")
    assert "9 runs x 0.75-2.62 min training (scaled from 2,000 to 500 steps)" in lines[1]
    assert sum("train.py" in line for line in lines) == 1
    assert not any("tswitch" in line for line in lines)
    evaluate_only = _dry_run("evaluate")
    assert not any("train.py" in line or "training" in line for line in evaluate_only)


def _tswitch(folder: Path, fids: dict, memorised: float = 0.0) -> None:
    """A tswitch.csv as evaluate.py's t_switch task writes it: method, t_switch -> FID."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(RunLayout(folder).tswitch_table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("method", "t_switch", "num_samples", "feature_extractor", "fid", "isc_mean", "isc_std",
                         "fraction_memorised", "mean_nearest_distance"))
        for (method, t_switch), fid in fids.items():
            writer.writerow((method, t_switch, 2000, "digits", fid, 8.5, 0.1, memorised, 0.5))


def test_the_report_writes_table2_and_figure5_from_run_folders(tmp_path, capsys):
    digits_seeds, seeded_report = _load_script("digits_seeds"), _load_script("seeded_report")
    steps = STUDY.steps_of(TABLE2)
    snapshots = steps // STUDY.snapshot_every_of(TABLE2)
    scorings = {scoring.key: scoring for scoring in TABLE2.scorings}
    for key, seed, run_dir in digits_seeds.run_folders(STUDY, TABLE2, steps, tmp_path):
        if (key, seed) == ("edm_knn", 2):
            continue  # not run
        offset = {"edm": 2.0, "edm_stf": 1.0, "edm_knn": 0.0}[key] + seed
        _scores(run_dir, STUDY, scorings["heun18"], [40.0 - 10 * i + offset for i in range(snapshots)],
                memorised=0.01 * seed, images=64_000)
        if (key, seed) != ("edm_stf", 1):  # the final snapshot not yet scored at 4 and 8 steps
            _scores(run_dir / "last", STUDY, scorings["heun4"], [30.0 + offset], images=256_000)
            _scores(run_dir / "last", STUDY, scorings["heun8"], [20.0 + offset], images=256_000)
        RunLayout(run_dir).snapshots.mkdir(parents=True)
        RunLayout(run_dir).snapshot(steps).write_bytes(b"network")
        if key == "edm" and seed < 2:
            _tswitch(run_dir / FIGURE5.tswitch.folder, {("knn", 0.0): 1.0 + seed, ("knn", 80.0): 10.0 + seed,
                                                        ("stf", 0.0): 30.0 + seed, ("forward", 0.0): 2.0 + seed},
                     memorised=1.0)
    sweep_folder = tmp_path / "digits_edm_steps2000"
    with open(sweep_folder / digits_seeds.COMMITS, "w") as handle:
        handle.write(json.dumps({"time": "T", "commit": "0123456789abcdef", "dirty": False, "command": "c"}) + "\n")

    out = tmp_path / "out"
    seeded_report.main(["--root", str(tmp_path), "--out", str(out)])
    table2 = (out / "table2.md").read_text()
    # the final snapshot: FID at 4, 8 and 18 Heun steps, mean ± std over seeds (edm: seeds 0-2, offsets 2-4)
    fid, isc, memorised = (block.splitlines() for block in table2.split("\n\n")
                           if block.startswith("| method | seeds | heun4"))
    assert fid[0] == "| method | seeds | heun4 | heun8 | heun18 | per seed: heun4 / heun8 / heun18 |"
    assert fid[2] == ("| EDM (standard target) | 3 | 33.00 ± 1.00 | 23.00 ± 1.00 | 13.00 ± 1.00 | s0: 32.00 / 22.00 / "
                      "12.00, s1: 33.00 / 23.00 / 13.00, s2: 34.00 / 24.00 / 14.00 |")
    assert fid[3].startswith("| EDM + STF (n 64) | 2/3 | 32.00 ± 1.41 | 22.00 ± 1.41 | 12.00 ± 1.00 |")
    assert "s1: - / - / 12.00" in fid[3] and fid[4].startswith("| EDM + KNN (k 256, n 64) | 2 | 30.50 ± 0.71 |")
    assert isc[2] == "| EDM (standard target) | 3 | 6.70 ± 0.10 | 7.70 ± 0.10 | 8.70 ± 0.10 |"
    assert memorised[2] == "| EDM (standard target) | 3 | 0.0 ± 0.0 | 0.0 ± 0.0 | 1.0 ± 1.0 |"  # %: 0, 1, 2
    assert "digits_edm_knn_steps2000/seed=2 (not run)" in table2
    assert "digits_edm_stf_steps2000/seed=1 (final snapshot not scored, heun4)" in table2
    assert "| 64k | 128k | 192k | 256k |" in table2 and "13.0 [12.0, 14.0]" in table2
    assert "`bash scripts/digits_seeds.sh table2`" in table2 and "commit 0123456789ab (from T)" in table2
    assert "no record in " in table2 and "digits_edm_knn_steps2000" in table2.split("no record in ")[1]
    figure5 = (out / "figure5.md").read_text()
    assert "| KNN, then the network | 2 | 1.50 ± 0.71 | 10.50 ± 0.71 |" in figure5
    assert "| forward process, then the network | 2 | 2.50 ± 0.71 |" in figure5
    assert "| KNN, then the network | 2 | 100.0 ± 0.0 |" in figure5  # memorisation share, %
    assert "The networks alone (heun18" in figure5 and "FID 13.00 ± 1.00 (3 seeds)" in figure5
    assert "digits_edm_steps2000/seed=2/tswitch (not swept)" in figure5
    assert (out / "table2_fid.png").stat().st_size > 0 and (out / "figure5.png").stat().st_size > 0
    assert not (out / "table1.md").exists() and not (out / "figure4.md").exists()
    err = capsys.readouterr().err
    assert "not written: table1: no finished run; missing: digits_ict_steps1600/seed=0 (not run)" in err
    assert "not written: figure4" in err


def test_the_report_without_runs_writes_nothing(tmp_path, capsys):
    seeded_report = _load_script("seeded_report")
    with pytest.raises(SystemExit) as stop:
        seeded_report.main(["--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert stop.value.code == 1 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "error: no finished run under " in err and "not written: table2: no finished run; missing: " in err
    assert "not written: figure5: no t_switch sweep; missing: digits_edm_steps2000/seed=0/tswitch (no network)" in err


def test_the_final_snapshot_folder_follows_the_run(tmp_path):
    """<run>/last holds the run's config and the final snapshot alone, the same file; re-made, it changes nothing,
    and a newer final snapshot replaces the old one."""
    digits_seeds = _load_script("digits_seeds")
    run = RunLayout(tmp_path / "seed=0")
    run.snapshots.mkdir(parents=True)
    run.config.write_text("dataset: {}\n")
    for step in (500, 1000):
        run.snapshot(step).write_bytes(b"w%d" % step)
    last = RunLayout(digits_seeds.prepare_last(run.root, run.snapshot(500)))
    assert [path.name for _, path in last.list_snapshots()] == [run.snapshot(500).name]
    assert last.snapshot(500).samefile(run.snapshot(500)) and last.config.read_text() == "dataset: {}\n"
    digits_seeds.prepare_last(run.root, run.snapshot(500))
    digits_seeds.prepare_last(run.root, run.snapshot(1000))
    assert [step for step, _ in last.list_snapshots()] == [1000] and last.snapshot(1000).samefile(run.snapshot(1000))
