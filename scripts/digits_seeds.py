"""Seeded small-scale evidence on digits (docs/reproducing.md): the seeded study of the paper manifest
(knn_cm/paper.py, DIGITS_SEEDS) as Hydra sweeps, then every finished run scored.

    bash scripts/digits_seeds.sh [all|table1|figure4|table2|figure5|evaluate] [--dry-run]   # from the repository root

Parts: ``table1`` (iCT, iCT + STF, iCT + KNN, 3 seeds each), ``figure4`` (KNN k 16 / 64 at n 64 and n 16 at k 256,
3 seeds each; the k 256 / n 64 point and the iCT baseline are Table 1's runs), ``table2`` (EDM with the standard,
STF and KNN targets, 3 seeds each), ``figure5`` (the t_switch sweep on each seed's Table 2 EDM network), ``all``
(every part, in this order: the whole seeded campaign), ``evaluate`` (score the finished runs of every part only).
Each sweep runs with the local launcher, one job after another, seed-major so an interrupted sweep leaves balanced
methods; run folders are named by the swept values: ``multirun/train/<sweep>_steps<STEPS>/<key=value,...>``.
Scoring, each a part's way (``SeededPart.scorings``): digits-feature FID / IS and the memorisation share on 2,000
samples of every EMA snapshot (``evaluate.py run_dir=...``), or of the final one alone through ``<run>/last`` (the
run's config.yaml and a hard link to that snapshot). Figure 5's sweep writes ``<run>/tswitch/tswitch.csv``.

Re-running the same command continues: training resumes from the newest checkpoint (trainer.resume=auto), scoring
skips what evaluation.jsonl holds, a t_switch sweep newer than its network is kept. Each command run is recorded
with the commit of the code (and whether it had uncommitted changes) in its sweep folder's seeded_commits.jsonl,
which the seeded report cites.

Environment, as the shell script always read it: PYTHON (default python), NICE (default ``nice -n 19``), STEPS and
SNAPSHOT_EVERY (default each part's own: Table 1 and Figure 4 the quickstart's 1,600 and 400, Table 2 digits_edm's
2,000 and 500; the curriculum and the cosine learning rate follow the run length). ``--dry-run`` prints the
commands and the campaign's cost on 2 CPU cores instead of running them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from knn_cm.paper import DIGITS_SEEDS, SeededPart, SeededStudy, SeededSweep, SeededTSwitch
from knn_cm.runs.layout import RunLayout

STUDY = DIGITS_SEEDS
ROOT = Path(__file__).resolve().parents[1]
COMMITS = "seeded_commits.jsonl"  # in each sweep folder: one line per command run on its runs
LAST = "last"  # <run>/last: the final snapshot alone, for the scorings of that snapshot only


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


def run_folders(study: SeededStudy, part: SeededPart, steps: int, root: str | Path | None = None
                ) -> list[tuple[str, int, Path]]:
    """(method key, seed, run folder) of every run of ``part``'s sweeps, in the order they train (seed-major);
    under ``root`` (default the study's)."""
    return [(method.key, seed, Path(root or study.root) / f"{sweep.folder_of(method)}_steps{steps}"
             / sweep.run_name(method, seed))
            for sweep in part.sweeps for seed in sweep.seeds for method in sweep.methods]


def network_runs(study: SeededStudy, tswitch: SeededTSwitch, steps: int, root: str | Path | None = None
                 ) -> list[tuple[int, Path]]:
    """(seed, run folder) of the runs whose networks a t_switch part samples with."""
    return [(seed, run_dir) for key, seed, run_dir in run_folders(study, study.part(tswitch.part), steps, root)
            if key == tswitch.method]


def evaluate_arguments(study: SeededStudy, run_dir: str, overrides: tuple[str, ...] = ()) -> list[str]:
    # quoted for Hydra: sweep folder names hold '=' and ',' (e.g. estimator.k=16,seed=0)
    return ["evaluate.py", f"run_dir='{run_dir}'", *study.evaluation, *overrides,
            f"hydra.run.dir='{run_dir}/evaluate'"]


def tswitch_arguments(tswitch: SeededTSwitch, network: Path, out: Path) -> list[str]:
    return ["evaluate.py", f"experiment={tswitch.experiment}", f"tswitch.network='{network}'", "progress=false",
            f"hydra.run.dir='{out}'"]


def prepare_last(run_dir: Path, snapshot: Path) -> Path:
    """``<run>/last``: the run's config.yaml and a hard link to ``snapshot`` (the same bytes and digest), alone."""
    last = RunLayout(run_dir / LAST)
    last.snapshots.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RunLayout(run_dir).config, last.config)
    for _, stale in last.list_snapshots():
        if stale.name != snapshot.name:
            stale.unlink()
    target = last.snapshots / snapshot.name
    if not (target.exists() and target.samefile(snapshot)):
        target.unlink(missing_ok=True)
        os.link(snapshot, target)
    return last.root


def code_version() -> dict:
    """The commit of this checkout and whether tracked files differ from it (None outside a git checkout)."""
    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def record(sweep_folder: Path, arguments: list[str]) -> None:
    """Append the command and the code's commit to ``<sweep folder>/seeded_commits.jsonl``."""
    sweep_folder.mkdir(parents=True, exist_ok=True)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **code_version(), "command": shlex.join(arguments)}
    with open(sweep_folder / COMMITS, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def read_commits(sweep_folder: Path) -> list[dict]:
    """The records of ``<sweep folder>/seeded_commits.jsonl``, oldest first (none when absent)."""
    path = sweep_folder / COMMITS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part_length(study: SeededStudy, part: SeededPart) -> tuple[int, int]:
    """(steps, snapshot_every) of ``part``'s runs (of the runs it samples with, for a t_switch part): STEPS and
    SNAPSHOT_EVERY when set, else the part's own."""
    own = study.part(part.tswitch.part) if part.tswitch is not None else part
    return (int(os.environ.get("STEPS") or study.steps_of(own)),
            int(os.environ.get("SNAPSHOT_EVERY") or study.snapshot_every_of(own)))


def cost(study: SeededStudy, parts: list[SeededPart], train: bool) -> list[str]:
    """The campaign's cost on 2 CPU cores from each part's measured minutes per run (training scaled linearly with
    the run length when STEPS differs from the part's), one line per part and a total."""
    lines, low, high = [], 0.0, 0.0
    for part in parts:
        steps, _ = part_length(study, part)
        if part.tswitch is not None:
            runs = len(network_runs(study, part.tswitch, steps))
            trained = 0
        else:
            runs = trained = sum(len(sweep.seeds) * len(sweep.methods) for sweep in part.sweeps)
        terms = []
        if train and trained and part.minutes is not None:
            own = study.steps_of(part)
            scale = steps / own
            terms.append((trained * part.minutes[0] * scale, trained * part.minutes[1] * scale,
                          f"{trained} runs x {part.minutes[0] * scale:.3g}-{part.minutes[1] * scale:.3g} min training"
                          + (f" (scaled from {own:,} to {steps:,} steps)" if steps != own else "")))
        if part.score_minutes is not None:
            what = "t_switch sweeps" if part.tswitch is not None else "scorings"
            terms.append((runs * part.score_minutes[0], runs * part.score_minutes[1],
                          f"{runs} {what} x {part.score_minutes[0]:.3g}-{part.score_minutes[1]:.3g} min"))
        if (train and trained and part.minutes is None) or part.score_minutes is None:
            terms.append((0.0, 0.0, "part of it not measured"))
        part_low, part_high = sum(t[0] for t in terms), sum(t[1] for t in terms)
        low, high = low + part_low, high + part_high
        lines.append(f"  {part.name}: " + " + ".join(t[2] for t in terms)
                     + f" = {part_low / 60:.1f}-{part_high / 60:.1f} h")
    return ["cost on 2 CPU cores, one job after another (minutes per run measured, or extrapolated from measured "
            "runs: docs/reproducing.md):", *lines,
            f"  total: {low / 60:.1f}-{high / 60:.1f} h"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> None:
    parts = [part.name for part in STUDY.parts]
    parser = argparse.ArgumentParser(prog="bash scripts/digits_seeds.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["all", *parts, "evaluate"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the cost, run nothing")
    args = parser.parse_args(argv)
    prefix = [*shlex.split(os.environ.get("NICE") or "nice -n 19"), os.environ.get("PYTHON") or "python"]
    chosen = [part for part in STUDY.parts if args.what in ("all", "evaluate", part.name)]

    def run(arguments: list[str], *sweep_folders_: Path) -> None:
        if args.dry_run:
            print(shlex.join(prefix + arguments), flush=True)
            return
        for folder in sweep_folders_:
            record(folder, arguments)
        code = subprocess.run(prefix + arguments).returncode
        if code != 0:
            sys.exit(code)  # as the shell script's set -e: stop at the first failure

    def evaluate(part: SeededPart) -> None:
        """Score every finished run of ``part`` (those with the final snapshot) each way the part scores."""
        steps, _ = part_length(STUDY, part)
        for _, _, run_dir in run_folders(STUDY, part, steps):
            final = RunLayout(run_dir).snapshot(steps)
            if not args.dry_run and not final.is_file():
                print(f"skip {run_dir} ({'unfinished' if run_dir.is_dir() else 'not run'})", flush=True)
                continue
            log(f"evaluate {run_dir}")
            prepared = False
            for scoring in sorted(part.scorings, key=lambda scoring: scoring.last_only):  # every snapshot first
                folder = run_dir / LAST if scoring.last_only else run_dir
                if scoring.last_only and not prepared:
                    if args.dry_run:
                        print(f"# {folder}: {RunLayout(run_dir).config.name} and a hard link to {final}", flush=True)
                    else:
                        prepare_last(run_dir, final)
                    prepared = True
                run(evaluate_arguments(STUDY, str(folder), scoring.overrides), run_dir.parent)

    def tswitch(part: SeededPart) -> None:
        """The t_switch sweep on each seed's network; one newer than its network is kept."""
        steps, _ = part_length(STUDY, part)
        for seed, run_dir in network_runs(STUDY, part.tswitch, steps):
            network, out = RunLayout(run_dir).snapshot(steps), run_dir / part.tswitch.folder
            table = RunLayout(out).tswitch_table
            if not args.dry_run:
                if not network.is_file():
                    print(f"skip seed {seed}: {network} not trained yet", flush=True)
                    continue
                if table.is_file() and table.stat().st_mtime >= network.stat().st_mtime:
                    print(f"done {table}", flush=True)
                    continue
            log(f"t_switch sweep, seed {seed}: {network}")
            run(tswitch_arguments(part.tswitch, network, out), run_dir.parent)

    if args.dry_run:
        print("\n".join(cost(STUDY, chosen, train=args.what != "evaluate")), flush=True)
    for part in chosen:
        steps, snapshot_every = part_length(STUDY, part)
        if args.what != "evaluate" and part.sweeps:
            log(f"{part.title} sweep{'s' if len(part.sweeps) > 1 else ''}")
            for sweep in part.sweeps:
                run(train_arguments(sweep, steps, snapshot_every),
                    *map(Path, sweep_folders(STUDY, (sweep,), steps)))
        if part.tswitch is not None:
            tswitch(part)
        else:
            evaluate(part)
    log("done")


if __name__ == "__main__":
    main()
