"""The paper's campaign (scripts/campaign.py): the dry run's jobs, resources and costs; dependencies on a real
scheduler when a job fails; the whole campaign at toy scale on the cluster, then the report."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from knn_cm.launch.campaign import RUN_TEMPLATE, CampaignJob, plan, sbatch_command, sweep_values
from knn_cm.paper import TABLE1, TABLE2
from knn_cm.report import build_report
from tests.slurm_helpers import FINAL_STATES, ROOT, job_env, job_state, read_output, tail, wait_for_state, wait_until

EXPERIMENTS = ("ict", "ict_stf", "ict_knn", "edm", "edm_stf", "edm_knn", "figure4_baseline")


def _campaign(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "scripts/campaign.py", *args], cwd=ROOT, env=env or job_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _blocks(dry_run: str) -> dict[str, dict[str, str]]:
    """job name -> {kind, command, resources, after, cost} from the dry run's output."""
    jobs = {}
    for block in dry_run.split("\n\n"):
        header = re.match(r"\[(\w+)\] (\S+)\n    (.*)\n    resources: (.*)\n    after: (.*)\n    cost: (.*)", block)
        if header:
            kind, name, command, resources, after, cost = header.groups()
            jobs[name] = {"kind": kind, "command": command, "resources": resources, "after": after, "cost": cost}
    return jobs


def test_dry_run_prints_every_job_with_its_resources_and_cost():
    """python scripts/campaign.py --dry-run (docs/slurm.md), with the site options of a real cluster."""
    output = _campaign("--dry-run", "--partition", "gpu", "--account", "lab").stdout
    jobs = _blocks(output)
    sweeps = [f"{name}-{key.split('.')[-1]}{value}" for name in ("figure4_k", "figure4_n")
              for key, values in [sweep_values(name)] for value in values]
    trainings = [*EXPERIMENTS, *sweeps]
    assert len(jobs) == 2 * len(trainings) + 2 == 28 and output.startswith("28 jobs")
    assert [name for name, job in jobs.items() if job["kind"] == "train"] == [f"knn-cm-train-{n}" for n in trainings]
    for name in trainings:
        train, evaluation = jobs[f"knn-cm-train-{name}"], jobs[f"knn-cm-eval-{name}"]
        assert " slurm/train.sbatch experiment=" in train["command"]
        assert "--partition=gpu --account=lab" in train["command"]
        assert "gpus-per-node=8" in train["resources"] and "requeue" in train["resources"]  # the template's
        assert evaluation["after"] == f"afterok:knn-cm-train-{name}"
        assert f"--dependency=afterok:<knn-cm-train-{name}> --kill-on-invalid-dep=yes" in evaluation["command"]
        assert re.search(r"slurm/run\.sbatch python evaluate\.py \"?run_dir=", evaluation["command"])
        assert "gpus-per-node=1" in evaluation["resources"] and evaluation["cost"].split(" ", 1)[1].startswith(
            "(estimate: ")
    # The paper's Table 4 where it gives a number; every other cost is an estimate with its basis.
    assert jobs["knn-cm-train-ict"]["cost"] == "188.9 (paper, Table 4)"
    assert jobs["knn-cm-train-ict_knn"]["cost"] == "220.5 (paper, Table 4)"
    assert jobs["knn-cm-train-ict_stf"]["cost"] == "185.8 (paper, Table 4)"
    assert jobs["knn-cm-train-edm"]["cost"] == "92.2 (estimate: 200.0 Mimg x Table 4's ict 0.461 h/Mimg)"
    assert jobs["knn-cm-train-figure4_baseline"]["cost"].startswith("94.5 (estimate: 204.8 Mimg x Table 4's ict ")
    assert jobs["knn-cm-train-figure4_k-k128"]["cost"].startswith("110.2 (estimate: 204.8 Mimg x Table 4's ict_knn")
    others = [job["cost"] for name, job in jobs.items() if name not in (
        "knn-cm-train-ict", "knn-cm-train-ict_knn", "knn-cm-train-ict_stf")]
    assert all("(estimate: " in cost for cost in others)
    total = re.search(r"total: ([\d.]+) A100-node hours = 595.2 from the paper's Table 4 \+ ([\d.]+) estimated", output)
    assert total and float(total.group(1)) == pytest.approx(595.2 + float(total.group(2)), abs=0.11)
    # Figure 5 waits for the EDM run's final network; the report for every evaluation, whatever their outcome.
    tswitch = jobs["knn-cm-eval-tswitch_sweep"]
    assert tswitch["after"] == "afterok:knn-cm-train-edm"
    assert "experiment=tswitch_sweep tswitch.network=outputs/train/edm/snapshots/network-000390625.pt" in tswitch[
        "command"]
    report = jobs["knn-cm-report-paper"]
    assert report["after"] == "afterany:" + ",".join(name for name in jobs if name.startswith("knn-cm-eval-"))
    assert report["command"].endswith("slurm/run.sbatch python scripts/report.py --train outputs/train --multirun "
                                      "multirun/train --tswitch outputs/evaluate/tswitch_sweep --out report")


def test_run_folders_are_the_ones_report_and_a_hydra_sweep_use():
    folders = {job.run_dir for job in plan(".") if job.kind == "train"}
    tables = {f"outputs/train/{method.experiment}" for method in TABLE1.methods + TABLE2.methods}
    assert tables | {"outputs/train/figure4_baseline"} <= folders
    assert {f"multirun/train/figure4_k/estimator.k={k}" for k in (128, 512, 2048)} <= folders
    assert {f"multirun/train/figure4_n/estimator.n={n}" for n in (16, 64, 256)} <= folders
    train = {job.name: job for job in plan(".")}["knn-cm-train-figure4_k-k128"]
    assert "run_name='estimator.k=128'" in train.arguments and "estimator.k=128" in train.arguments
    with pytest.raises(ValueError, match="scale must be one of paper, toy, got 'cifar'"):
        plan(".", "cifar")


@pytest.mark.slurm
def test_a_failed_job_cancels_its_dependents_and_the_report_still_runs(slurm_jobs, tmp_path):
    """afterok + --kill-on-invalid-dep=yes: the evaluation of a failed run is cancelled, never left pending;
    the report (afterany) runs and marks the run missing."""
    env = job_env(KNN_CM_PYTHON_ENV=str(Path(sys.executable).parent / "activate"))
    toy = ("--cpus-per-task=1", "--mem=1G")
    jobs = [CampaignJob("knn-cm-test-train", "train", RUN_TEMPLATE, ("python", "-c", "raise SystemExit(3)"), toy),
            CampaignJob("knn-cm-test-eval", "evaluate", RUN_TEMPLATE, ("python", "-c", "print('evaluated')"), toy,
                        after=("knn-cm-test-train",)),
            CampaignJob("knn-cm-test-report", "report", RUN_TEMPLATE, ("python", "-c", "print('reported')"), toy,
                        after=("knn-cm-test-eval",), dependency="afterany")]
    ids = {}
    for job in jobs:
        command = sbatch_command(job, str(tmp_path), ids)
        ids[job.name] = slurm_jobs.adopt(subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                                        check=True).stdout.strip())
    assert wait_for_state(ids["knn-cm-test-report"], "COMPLETED", timeout=120)
    assert "reported" in read_output(ids["knn-cm-test-report"])
    assert job_state(ids["knn-cm-test-train"]) == "FAILED" and job_state(ids["knn-cm-test-eval"]) == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.slow
def test_the_toy_campaign_runs_every_job_and_the_report_builds_every_table_and_figure(slurm_jobs, tmp_path):
    """python scripts/campaign.py --scale toy --root DIR (docs/slurm.md) on the cluster: 13 training runs,
    their evaluations, the t_switch sweep and the report job."""
    env = job_env(KNN_CM_PYTHON_ENV=str(Path(sys.executable).parent / "activate"))
    _campaign("--scale", "toy", "--root", str(tmp_path), env=env)
    records = json.loads((tmp_path / "campaign.json").read_text())
    ids = {record["name"]: slurm_jobs.adopt(record["job_id"]) for record in records}
    assert len(ids) == 28
    report_job = ids["knn-cm-report-toy"]
    # Watching, as docs/slurm.md shows it: the report waits for its inputs.
    queue = subprocess.run(["squeue", "-o", "%.6i %.32j %.2t %.8M %R"], capture_output=True, text=True, check=True,
                           timeout=30).stdout
    assert re.search(rf"{report_job} +knn-cm-report-toy +PD .*\(Dependency\)", queue), queue

    def finished():
        return job_state(report_job) in FINAL_STATES

    wait_until(finished, 900, "the toy campaign's report job", poll=2)
    states = {name: job_state(job) for name, job in ids.items()}
    failed = {name: state for name, state in states.items() if state != "COMPLETED"}
    assert not failed, (failed, {name: tail(read_output(ids[name]), 15) for name in failed})
    report = tmp_path / "report"
    for name in ("table1.md", "table2.md", "figure4_k.png", "figure4_n.png", "figure5.png", "tswitch.csv"):
        assert (report / name).stat().st_size > 0, name
    for spec in (TABLE1, TABLE2):
        with open(report / f"{spec.name}.csv", newline="") as handle:
            rows = {row["method"]: row for row in csv.DictReader(handle)}
        assert list(rows) == [method.label for method in spec.methods]
        for row in rows.values():
            assert row["status"] == "complete" and float(row["fid"]) > 0 and row["feature_extractor"] == "digits"
    assert "at toy scale" in (report / "table1.md").read_text()
    # Figure 4 from the sweep folders (one curve per value: snapshots at steps 2 and 4), Figure 5 from the sweep.
    result = build_report(tmp_path / "outputs" / "train", tmp_path / "check", tmp_path / "multirun" / "train",
                          tmp_path / "outputs" / "evaluate" / "tswitch_sweep", scale="toy")
    assert set(result["figure4_k"]) == {"iCT baseline", "estimator.k=128", "estimator.k=512", "estimator.k=2048"}
    assert set(result["figure4_n"]) == {"iCT baseline", "estimator.n=16", "estimator.n=64", "estimator.n=256"}
    assert all(len(points) == 2 for name in ("figure4_k", "figure4_n") for points in result[name].values())
    assert {(row["method"], row["t_switch"]) for row in result["figure5"]} >= {("knn", 1.0), ("stf", 1.0)}


def test_campaign_outside_the_repository_root_is_refused_with_the_reason(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "campaign.py"), "--dry-run"], cwd=tmp_path,
                            env=job_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run from the repository root: train.py" in result.stderr
