"""The paper manifest (knn_cm/paper.py) is the one place the paper's runs are listed: its experiments exist, the
report, the campaign, the costs and the seeded scripts derive their lists from it and spell none of them, and the
seeded sweeps' commands write the run folders the seeded report reads."""

from __future__ import annotations

import ast
import csv
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from knn_cm import paper
from knn_cm.cli import CONFIGS, experiment_app
from knn_cm.launch import campaign, cost
from knn_cm.report import build_report

ROOT = Path(__file__).resolve().parents[3]
# The modules that listed the paper's runs before the manifest; now they read it.
READERS = ("knn_cm/report.py", "knn_cm/launch/campaign.py", "knn_cm/launch/cost.py", "scripts/report.py",
           "scripts/campaign.py", "scripts/seeded_report.py", "scripts/digits_seeds.py")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest_names() -> set[str]:
    """Experiments and seeded method keys: the names a reader would spell if it listed runs itself."""
    keys = {method.key for study in paper.SEEDED_STUDIES.values() for sweep in study.sweeps()
            for method in sweep.methods}
    return paper.experiments() | keys


def _manifest_numbers() -> set[float]:
    """What the paper reports: FID, IS, Table 4's hours and ratios (1.0, iCT against itself, is any code's)."""
    numbers = {value for table in paper.TABLES for method in table.methods for value in (method.fid, method.isc)}
    numbers |= {run.node_hours for run in paper.TABLE4.runs} | {run.time_vs_ict for run in paper.TABLE4.runs}
    return {number for number in numbers if number not in (None, 1.0)} | {paper.TABLE4.steps}


def _code_constants(path: Path) -> list[tuple[int, object]]:
    """(line, value) of every constant in the module's code; docstrings are prose and left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and id(node) not in docstrings]


def test_every_experiment_the_manifest_names_exists():
    names = paper.experiments()
    assert {"ict_knn", "edm", "figure4_k", "tswitch_sweep", "quickstart", "figure3"} <= names
    missing = sorted(name for name in names if experiment_app(CONFIGS, name) is None)
    assert not missing, f"named in knn_cm/paper.py, absent from every configs/<app>/experiment/: {missing}"


@pytest.mark.parametrize("reader", READERS)
def test_readers_spell_no_run_and_no_paper_number(reader):
    """Fails on the code before the manifest (report.py's TABLE1, campaign.py's TABLE_EXPERIMENTS, cost.py's
    TABLE4_NODE_HOURS, seeded_report.py's SWEEPS, ...): each spelled experiment names or the paper's numbers."""
    names, numbers = _manifest_names(), _manifest_numbers()
    found = []
    for line, value in _code_constants(ROOT / reader):
        if isinstance(value, str):
            found += [(line, token) for token in re.findall(r"[\w/]+", value) if token in names]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value in numbers:
            found.append((line, value))
    assert not found, f"{reader} spells what knn_cm/paper.py holds (line, value): {found}"


def test_the_shell_script_spells_no_run():
    code = [line for line in (ROOT / "scripts/digits_seeds.sh").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    tokens = {token for line in code for token in re.findall(r"[\w/]+", line)}
    assert not tokens & _manifest_names(), tokens & _manifest_names()


def test_every_experiment_composes_with_what_the_manifest_says_of_it():
    """Table 4's runs use the estimators the manifest gives their cost basis, at Table 4's steps and batch; the
    seeded overrides are settings of their experiments."""
    seeded = [(method.experiment, method.overrides) for study in paper.SEEDED_STUDIES.values()
              for sweep in study.sweeps() for method in sweep.methods if method.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "configs" / "train"), version_base="1.3"):
        for run in paper.TABLE4.runs:
            config = compose("train", [f"experiment={run.experiment}", "run_name=x"])
            assert config.estimator.name == run.estimator
            trainer = config.trainer
            assert (trainer.max_steps, trainer.batch_size) == (paper.TABLE4.steps, paper.TABLE4.batch_size)
        for experiment, overrides in seeded:
            config = compose("train", [f"experiment={experiment}", "run_name=x"])
            for override in overrides:
                key, _, value = override.partition("=")
                setting = OmegaConf.select(config, key, default=KeyError)
                assert setting is not KeyError, f"{override}: {key} is no setting of experiment {experiment}"
                assert str(setting) != value, f"{override} is already experiment {experiment}'s setting"


def test_costs_come_from_table4_of_the_manifest():
    assert cost.training_cost("ict_knn", "knn", paper.TABLE4.steps, paper.TABLE4.batch_size).node_hours == 220.5
    assert cost.TABLE4_RUN_OF_ESTIMATOR == {"single": "ict", "knn": "ict_knn", "stf": "ict_stf"}


def test_the_report_takes_its_rows_from_the_manifest(tmp_path, monkeypatch):
    """A row added to the manifest appears in the report, with the paper's numbers beside it."""
    monkeypatch.setattr(paper, "TABLES", (paper.Table("table1", "Table 1: t", (
        paper.Method("a new row", "some_run", fid=1.5, isc=2.5),)),))
    result = build_report(tmp_path / "train", tmp_path / "report")
    assert [row["method"] for row in result["table1"]] == ["a new row"] and "table2" not in result
    assert result["table1"][0]["run"] == str(tmp_path / "train" / "some_run")
    markdown = (tmp_path / "report" / "table1.md").read_text()
    assert "| a new row | - | - |" in markdown
    assert markdown.rstrip().endswith("| 1.50 / 2.50 |")


def test_the_campaign_takes_its_runs_from_the_manifest(monkeypatch):
    labels = [run.label for run in campaign.training_runs(".")]
    key, values = campaign.sweep_values("figure4_k")
    assert labels[:7] == list(paper.training_experiments()) and f"figure4_k/{key}={values[0]}" in labels
    monkeypatch.setattr(paper, "TABLES", (paper.TABLE1,))
    monkeypatch.setattr(paper, "FIGURE4", paper.AblationFigure(paper.FIGURE4.baseline, paper.FIGURE4.panels[1:]))
    labels = [run.label for run in campaign.training_runs(".")]
    assert labels[:4] == ["ict", "ict_stf", "ict_knn", "figure4_baseline"]
    assert labels[4:] == [f"figure4_n/{key}={value}" for key, values in [campaign.sweep_values("figure4_n")]
                          for value in values]


def test_a_seeded_sweep_must_be_a_grid():
    method = paper.SeededMethod
    with pytest.raises(ValueError, match="one experiment per named sweep folder"):
        paper.SeededSweep((0,), (method("a", "quickstart"), method("b", "digits_ict")), folder="f")
    with pytest.raises(ValueError, match="same keys"):
        paper.SeededSweep((0,), (method("a", "quickstart", ("estimator.k=16",)), method("b", "quickstart")), "f")
    with pytest.raises(ValueError, match="must share their overrides"):
        paper.SeededSweep((0,), (method("a", "quickstart", ("estimator.k=16",)),
                                 method("b", "digits_ict", ("estimator.k=64",))))


def test_digits_seeds_runs_the_documented_sweeps():
    """bash scripts/digits_seeds.sh all --dry-run: the train.py commands it ran before the manifest."""
    env = dict(os.environ, PYTHON=sys.executable, NICE="nice -n 5", STEPS="400", SNAPSHOT_EVERY="100")
    result = subprocess.run(["bash", "scripts/digits_seeds.sh", "all", "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    length = "trainer.max_steps=400 trainer.snapshot_every=100 trainer.progress=false"
    trains = [line.split(" train.py ", 1)[1] for line in result.stdout.splitlines() if " train.py " in line]
    assert trains[:3] == [
        "-m seed=0,1,2 experiment=digits_ict,digits_ict_stf,quickstart "
        f"'run_name=${{hydra:runtime.choices.experiment}}_steps${{trainer.max_steps}}' {length}",
        f"-m seed=0,1,2 estimator.k=16,64 experiment=quickstart run_name=digits_figure4_k_steps400 {length}",
        f"-m seed=0,1,2 experiment=quickstart run_name=digits_figure4_n_steps400 estimator.n=16 {length}"]
    assert all(line.startswith(f"nice -n 5 {sys.executable} train.py") for line in result.stdout.splitlines()
               if " train.py " in line)
    bad = subprocess.run(["bash", "scripts/digits_seeds.sh", "table3"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'table3'" in bad.stderr


def test_the_seeded_report_reads_the_folders_the_sweeps_write(tmp_path):
    """Each seeded command, expanded job by job as Hydra's grid does and named by the stable sweeper, writes the
    run folders the seeded scripts name (SeededSweep.run_name), and the report counts every method of the study with
    all its seeds from them."""
    from hydra_plugins.knn_cm_sweeper.stable_sweeper import subdir_name

    digits_seeds, seeded_report = _load_script("digits_seeds"), _load_script("seeded_report")
    study, steps = paper.DIGITS_SEEDS, 8
    written = set()
    for sweep in study.sweeps():
        arguments = digits_seeds.train_arguments(sweep, steps, 4)[2:]
        swept = {arg.partition("=")[0] for arg in arguments if "," in arg}
        grids = [[f"{arg.partition('=')[0]}={value}" for value in arg.partition("=")[2].split(",")]
                 for arg in arguments]
        for job in itertools.product(*grids):
            experiment = next(arg.partition("=")[2] for arg in job if arg.startswith("experiment="))
            sweep_folder = sweep.folder or experiment
            folder = tmp_path / f"{sweep_folder}_steps{steps}" / subdir_name(list(job), swept, ["experiment"])
            written.add(folder)
    part_of = {run_dir: part for part in study.parts
               for _, _, run_dir in digits_seeds.run_folders(study, part, steps, tmp_path)}
    assert written == set(part_of)
    for folder, part in part_of.items():  # every scoring of every snapshot, with the settings the study scores with
        for scoring in part.scorings:
            _scores(folder / "last" if scoring.last_only else folder, study, scoring, [9.0, 8.0])
    found, expected = {}, {}
    for part in study.parts:
        if part.sweeps:
            runs, missing = seeded_report.read_part(tmp_path, study, part, steps, 2)
            assert not missing
            for scoring in part.scorings:
                found |= {(scoring.key, key): set(seeds) for key, seeds in runs[scoring.key].items()}
                expected |= {(scoring.key, method.key): set(sweep.seeds) for sweep in part.sweeps
                             for method in sweep.methods}
    assert found == expected
    assert expected[("snapshots", "knn_k64_n64")] == {0, 1, 2} and expected[("heun8", "edm_knn")] == {0, 1, 2}


def _scores(folder: Path, study, scoring, fids, memorised=0.0, images=512):
    """Rows of evaluation.csv as evaluate.py writes them: one per snapshot (``images`` apart) with these FIDs,
    added to the rows of other scorings in ``folder``."""
    settings = dict(o.partition("=")[::2] for o in (*study.evaluation, *scoring.overrides))
    folder.mkdir(parents=True, exist_ok=True)
    sampler_settings = {"num_steps": int(settings.get("sampler.num_steps", 18)), "sigma_min": 0.002}
    new = not (folder / "evaluation.csv").exists()
    with open(folder / "evaluation.csv", "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(("step", "images_seen", "sampler", "sampler_settings", "num_samples",
                             "feature_extractor", "fid", "isc_mean", "fraction_memorised"))
        for i, fid in enumerate(fids, 1):
            writer.writerow((i * 4, i * images, settings.get("sampler.kind", "consistency"),
                             json.dumps(sampler_settings), settings["num_samples"],
                             settings["metrics.feature_extractor"], fid, 10.0 - fid / 10, memorised))
