"""Seeded small-scale evidence on digits (docs/reproducing.md): the seeded study of the paper manifest
(knn_cm/paper.py, DIGITS_SEEDS) as Hydra sweeps, then every EMA snapshot of every finished run scored.

    bash scripts/digits_seeds.sh [all|table1|figure4|evaluate] [--dry-run]     # (this script, from the repository root)

Parts: ``table1`` (iCT, iCT + STF, iCT + KNN, 3 seeds each), ``figure4`` (KNN k 16 / 64 at n 64 and n 16 at k 256,
3 seeds each; the k 256 / n 64 point and the iCT baseline are Table 1's runs), ``all`` (both), ``evaluate`` (score
the finished runs of every part only). Each sweep runs with the local launcher, one job after another, seed-major so
an interrupted sweep leaves balanced methods; run folders are named by the swept values:
``multirun/train/<sweep>_steps<STEPS>/<key=value,...>``. Scoring: digits-feature FID / IS on 2,000 one-step samples
(``evaluate.py run_dir=...``). Re-running resumes (trainer.resume=auto; evaluation.jsonl).

Environment, as the shell script always read it: PYTHON (default python), NICE (default ``nice -n 19``), STEPS and
SNAPSHOT_EVERY (default the study's 1,600 and 400: the quickstart's length; the curriculum and the cosine learning
rate follow the run length). ``--dry-run`` prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from knn_cm.paper import DIGITS_SEEDS, SeededStudy, SeededSweep
from knn_cm.runs.layout import RunLayout

STUDY = DIGITS_SEEDS


def train_arguments(sweep: SeededSweep, steps: int, snapshot_every: int) -> list[str]:
    """``train.py -m ...`` of one seeded sweep: seeds first (they vary slowest), then the swept values."""
    experiments = list(dict.fromkeys(method.experiment for method in sweep.methods))
    swept = sweep.swept()
    fixed = list(dict.fromkeys(o for m in sweep.methods for o in m.overrides if o.partition("=")[0] not in swept))
    run_name = (f"{sweep.folder}_steps{steps}" if sweep.folder is not None
                else "${hydra:runtime.choices.experiment}_steps${trainer.max_steps}")
    return ["train.py", "-m", "seed=" + ",".join(str(seed) for seed in sweep.seeds),
            *(f"{key}={','.join(values)}" for key, values in swept.items()),
            "experiment=" + ",".join(experiments), f"run_name={run_name}", *fixed,
            f"trainer.max_steps={steps}", f"trainer.snapshot_every={snapshot_every}", "trainer.progress=false"]


def sweep_folders(study: SeededStudy, sweeps: tuple[SeededSweep, ...], steps: int) -> list[str]:
    """The sweep folders of ``sweeps``, in order: ``<root>/<sweep>_steps<steps>``."""
    return list(dict.fromkeys(f"{study.root}/{sweep.folder_of(method)}_steps{steps}"
                              for sweep in sweeps for method in sweep.methods))


def evaluate_arguments(study: SeededStudy, run_dir: str) -> list[str]:
    # quoted for Hydra: sweep folder names hold '=' and ',' (e.g. estimator.k=16,seed=0)
    return ["evaluate.py", f"run_dir='{run_dir}'", *study.evaluation, f"hydra.run.dir='{run_dir}/evaluate'"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> None:
    parts = [part.name for part in STUDY.parts]
    parser = argparse.ArgumentParser(prog="bash scripts/digits_seeds.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["all", *parts, "evaluate"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    prefix = [*shlex.split(os.environ.get("NICE") or "nice -n 19"), os.environ.get("PYTHON") or "python"]
    steps = int(os.environ.get("STEPS") or STUDY.steps)
    snapshot_every = int(os.environ.get("SNAPSHOT_EVERY") or STUDY.snapshot_every)

    def run(arguments: list[str]) -> None:
        if args.dry_run:
            print(shlex.join(prefix + arguments), flush=True)
            return
        code = subprocess.run(prefix + arguments).returncode
        if code != 0:
            sys.exit(code)  # as the shell script's set -e: stop at the first failure

    def evaluate(sweeps: tuple[SeededSweep, ...]) -> None:
        """Score every finished run folder of ``sweeps`` (those with the final snapshot)."""
        for sweep_folder in sweep_folders(STUDY, sweeps, steps):
            if not Path(sweep_folder).is_dir():
                print(f"skip {sweep_folder} (not run)", flush=True)
                continue
            for run_dir in sorted(p for p in Path(sweep_folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
                if not RunLayout(run_dir).snapshot(steps).is_file():
                    print(f"skip {run_dir} (unfinished)", flush=True)
                    continue
                log(f"evaluate {run_dir}")
                run(evaluate_arguments(STUDY, str(run_dir)))

    for part in STUDY.parts:
        if args.what in ("all", part.name):
            log(f"{part.title} sweep{'s' if len(part.sweeps) > 1 else ''}")
            for sweep in part.sweeps:
                run(train_arguments(sweep, steps, snapshot_every))
            evaluate(part.sweeps)
    if args.what == "evaluate":
        evaluate(STUDY.sweeps())
    log("done")


if __name__ == "__main__":
    main()
