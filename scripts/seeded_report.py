"""Seeded small-scale results from the run folders of scripts/digits_seeds.sh (docs/reproducing.md).

    python scripts/seeded_report.py [--root multirun/train] [--out DIR] [--steps N --snapshot-every M]

Reads the run folders of every part of the seeded study (the paper manifest's DIGITS_SEEDS): each scoring's
``evaluation.csv`` (digits-feature FID / IS and memorisation share; the final snapshot's scorings from
``<run>/last``) and each t_switch sweep's ``<run>/tswitch/tswitch.csv``. It writes into DIR (default
``docs/results/seeds_steps<steps>``, each part at its run length):
- table1.md: best FID and the IS at that snapshot per method, mean +- std (sample std, ddof 1) over seeds, with
  each seed's values, and the number of finished runs; table1_fid.png: FID against images seen, the seeds' mean
  with a min-max band per method;
- figure4.png / figure4.md: the same for the KNN k sweep (n 64) and n sweep (k 256) against iCT;
- table2.md: at the final snapshot, FID, IS and memorisation share per Heun step count, mean +- std over seeds,
  and FID against images seen; table2_fid.png;
- figure5.md / figure5.png: FID (and memorisation share) against t_switch per method, mean +- std over seeds,
  the figure with min-max bands.
A run counts only when everything it should have is scored; each file lists the runs it lacks, the commands that
make it and the commits recorded for its runs (digits_seeds.py's seeded_commits.jsonl in each sweep folder). A
table with no finished run is not written (an existing one is left as it is), and the report says what it lacks.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_seeds import LAST, code_version, network_runs, read_commits, run_folders

from knn_cm.paper import DIGITS_SEEDS, SeededPart, SeededScoring, SeededStudy
from knn_cm.runs.layout import RunLayout

# The study's methods, tables and run folders: the paper manifest (knn_cm/paper.py).
STUDY = DIGITS_SEEDS


class Point(NamedTuple):
    images: int
    fid: float
    isc: float
    memorised: float | None


def _number(text):
    return None if text in (None, "") else float(text)


def matches(row: dict, overrides: tuple[str, ...]) -> bool:
    """Whether an evaluation.csv row was made with these evaluate.py overrides (the keys the table records)."""
    settings = json.loads(row.get("sampler_settings") or "{}")
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "num_samples":
            found, wanted = _number(row.get("num_samples")), float(value)
        elif key == "metrics.feature_extractor":
            found, wanted = row.get("feature_extractor"), value
        elif key == "sampler.kind":
            found, wanted = row.get("sampler"), value
        elif key.startswith("sampler.") and key.partition(".")[2] in settings:
            found, wanted = settings[key.partition(".")[2]], value
            if not isinstance(found, list):
                found, wanted = float(found), float(value)
        else:
            continue  # a setting the table does not record (progress, ...)
        if found != wanted:
            return False
    return True


def scored(folder: Path, study: SeededStudy, scoring: SeededScoring) -> list[Point]:
    """The snapshots of ``folder`` scored with the study's evaluation and ``scoring``'s overrides, oldest first."""
    path = RunLayout(folder).evaluation_table
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle)
                if row.get("fid") not in (None, "") and matches(row, (*study.evaluation, *scoring.overrides))]
    points = {int(row["images_seen"]): Point(int(row["images_seen"]), float(row["fid"]), float(row["isc_mean"]),
                                             _number(row.get("fraction_memorised"))) for row in rows}
    return [points[images] for images in sorted(points)]


def read_part(root: Path, study: SeededStudy, part: SeededPart, steps: int, snapshots: int
              ) -> tuple[dict, list[str]]:
    """scoring key -> method -> seed -> [Point] for ``part``'s finished runs, and what is missing (one line per run).

    A run counts for a scoring when its every snapshot (``snapshots``) is scored that way, or its final one for a
    scoring of the final snapshot alone (``<run>/last``).
    """
    runs, missing = defaultdict(lambda: defaultdict(dict)), []
    for key, seed, run_dir in run_folders(study, part, steps, root):
        name = f"{run_dir.parent.name}/{run_dir.name}"
        if not run_dir.is_dir():
            missing.append(f"{name} (not run)")
            continue
        for scoring in part.scorings:
            points = scored(run_dir / LAST if scoring.last_only else run_dir, study, scoring)
            wanted = 1 if scoring.last_only else snapshots
            if len(points) < wanted:
                what = "final snapshot not scored" if scoring.last_only else f"{len(points)} of {snapshots} scored"
                missing.append(f"{name} ({what}{f', {scoring.key}' if len(part.scorings) > 1 else ''})")
                continue
            runs[scoring.key][key][seed] = points[-wanted:] if scoring.last_only else points
    return runs, missing


def read_tswitch(root: Path, study: SeededStudy, part: SeededPart, steps: int) -> tuple[dict, list[str]]:
    """seed -> [tswitch.csv rows] of a t_switch part, and the seeds without one."""
    found, missing = {}, []
    for seed, run_dir in network_runs(study, part.tswitch, steps, root):
        path = RunLayout(run_dir / part.tswitch.folder).tswitch_table
        if not path.is_file():
            network = "no network" if not RunLayout(run_dir).snapshot(steps).is_file() else "not swept"
            missing.append(f"{run_dir.parent.name}/{run_dir.name}/{part.tswitch.folder} ({network})")
            continue
        with open(path, newline="") as handle:
            found[seed] = [row for row in csv.DictReader(handle) if row.get("fid") not in (None, "")]
    return found, missing


def best(curve):
    """(best FID, IS at that snapshot, images seen there)."""
    images, fid, isc, _ = min(curve, key=lambda point: point.fid)
    return fid, isc, images


def mean_std(values, digits=2):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs, methods: dict) -> str:
    lines = ["| method | seeds | best FID (mean ± std) | IS at best (mean ± std) | per seed: best FID / IS |",
             "|---|---|---|---|---|"]
    for key, label in methods.items():
        seeds = runs.get(key, {})
        if not seeds:
            lines.append(f"| {label} | 0 | not run | | |")
            continue
        bests = {seed: best(curve) for seed, curve in sorted(seeds.items())}
        per_seed = ", ".join(f"s{seed}: {fid:.2f} / {isc:.2f}" for seed, (fid, isc, _) in bests.items())
        lines.append(f"| {label} | {len(seeds)} | {mean_std([b[0] for b in bests.values()])} | "
                     f"{mean_std([b[1] for b in bests.values()])} | {per_seed} |")
    return "\n".join(lines)


def curves_table(runs, methods: dict) -> str:
    """FID at each snapshot: mean [min, max] over seeds."""
    points = sorted({point.images for key in methods for curve in runs.get(key, {}).values() for point in curve})
    lines = ["| method | " + " | ".join(f"{images / 1000:.0f}k" for images in points) + " |",
             "|---|" + "---|" * len(points)]
    for key, label in methods.items():
        seeds = runs.get(key, {})
        if not seeds:
            continue
        cells = []
        for images in points:
            values = [point.fid for curve in seeds.values() for point in curve if point.images == images]
            cells.append(f"{statistics.mean(values):.1f} [{min(values):.1f}, {max(values):.1f}]" if values else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(by_scoring: dict, methods: dict, scorings: tuple[SeededScoring, ...], metric: str) -> str:
    """``metric`` (fid, isc or memorised, in %) at the final snapshot per method and scoring, mean ± std over seeds;
    with each seed's values for FID."""
    names = [scoring.key for scoring in scorings]
    per_seed = metric == "fid"
    lines = ["| method | seeds | " + " | ".join(names) + (" | per seed: " + " / ".join(names) if per_seed else "")
             + " |", "|---|---|" + "---|" * (len(names) + per_seed)]
    for key, label in methods.items():
        finals = {name: {seed: curve[-1] for seed, curve in by_scoring.get(name, {}).get(key, {}).items()}
                  for name in names}
        seeds = sorted(set().union(*(set(found) for found in finals.values())))
        if not seeds:
            lines.append(f"| {label} | 0 | not run |" + " |" * (len(names) - 1 + per_seed))
            continue
        cells = []
        for name in names:
            values = [getattr(point, metric) for point in finals[name].values()]
            values = [100 * value for value in values if value is not None] if metric == "memorised" else values
            cells.append(mean_std(values, 1 if metric == "memorised" else 2) if values else "")
        if per_seed:
            cells.append(", ".join(f"s{seed}: " + " / ".join(f"{finals[name][seed].fid:.2f}" if seed in finals[name]
                                                              else "-" for name in names) for seed in seeds))
        counts = "/".join(str(count) for count in sorted({len(found) for found in finals.values()}))
        lines.append(f"| {label} | {counts} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tswitch_table(sweeps: dict, methods: dict, metric: str, scale: float = 1.0, digits: int = 2) -> str:
    """``metric`` of tswitch.csv per method and t_switch, mean ± std over the seeds' sweeps."""
    t_switches = sorted({float(row["t_switch"]) for rows in sweeps.values() for row in rows})
    lines = ["| method | seeds | " + " | ".join(f"{t:g}" for t in t_switches) + " |",
             "|---|---|" + "---|" * len(t_switches)]
    for key, label in methods.items():
        cells, seeds = [], set()
        for t in t_switches:
            values = {seed: scale * float(row[metric]) for seed, rows in sweeps.items() for row in rows
                      if row["method"] == key and float(row["t_switch"]) == t and row.get(metric) not in (None, "")}
            seeds |= set(values)
            cells.append(mean_std(list(values.values()), digits) if values else "")
        lines.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(axis, runs, methods: dict, title: str, ylabel: str = "FID (digits features, 2,000 samples)") -> None:
    for key, label in methods.items():
        seeds = runs.get(key, {})
        if not seeds:
            continue
        points = sorted({point.images for curve in seeds.values() for point in curve})
        values = [[point.fid for curve in seeds.values() for point in curve if point.images == images]
                  for images in points]
        mean = [statistics.mean(v) for v in values]
        line, = axis.plot(points, mean, "-o", markersize=3, label=f"{label} ({len(seeds)} seeds)")
        axis.fill_between(points, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                          alpha=0.2, linewidth=0)
    axis.set_xlabel("images seen")
    axis.set_ylabel(ylabel)
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)


def plot_tswitch(axis, sweeps: dict, methods: dict, title: str) -> None:
    for key, label in methods.items():
        by_t = defaultdict(list)
        for rows in sweeps.values():
            for row in rows:
                if row["method"] == key:
                    by_t[float(row["t_switch"])].append(float(row["fid"]))
        if not by_t:
            continue
        ts = sorted(by_t)
        line, = axis.plot(ts, [statistics.mean(by_t[t]) for t in ts], "-o", markersize=3,
                          label=f"{label} ({max(len(v) for v in by_t.values())} seeds)")
        axis.fill_between(ts, [min(by_t[t]) for t in ts], [max(by_t[t]) for t in ts], color=line.get_color(),
                          alpha=0.2, linewidth=0)
    axis.set_xscale("symlog", linthresh=0.1)
    axis.set_yscale("log")
    axis.set_xlabel("t_switch")
    axis.set_ylabel("FID (digits features)")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)


def provenance(sweep_folders, commands: list[str]) -> str:
    """The commands that make a table and the commits its runs and scorings were made at (seeded_commits.jsonl)."""
    commits, unrecorded = {}, []
    for folder in sorted(set(sweep_folders)):
        entries = read_commits(folder)
        if not entries:
            unrecorded.append(Path(folder).name)
        for entry in entries:
            name = (entry.get("commit") or "unknown")[:12] + (" with uncommitted changes" if entry.get("dirty") else "")
            commits.setdefault(name, entry.get("time"))
    made = ", ".join(f"{name} (from {since})" for name, since in commits.items()) or "not recorded"
    if unrecorded:
        made += f" (no record in {', '.join(unrecorded)}: made before digits_seeds.py recorded commits, or not run)"
    here = code_version()
    report = (here["commit"] or "unknown")[:12] + (" with uncommitted changes" if here["dirty"] else "")
    return ("Commands: " + "; ".join(f"`{command}`" for command in commands) + f"\n\nRuns and scores made at commit "
            f"{made}; this report written at commit {report}.")


def missing_note(missing: list[str]) -> str:
    return ("\n\nMissing or unfinished runs (not counted): " + "; ".join(missing)) if missing else ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=STUDY.root)
    parser.add_argument("--out", default=None, help="default: docs/results/seeds_steps<steps> of each part")
    parser.add_argument("--steps", type=int, default=None, help="run length (STEPS of digits_seeds.sh); default: "
                        "each part's own")
    parser.add_argument("--snapshot-every", type=int, default=None, help="SNAPSHOT_EVERY of digits_seeds.sh")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(args.root)

    def length(part: SeededPart) -> tuple[int, int]:
        own = STUDY.part(part.tswitch.part) if part.tswitch is not None else part
        return args.steps or STUDY.steps_of(own), args.snapshot_every or STUDY.snapshot_every_of(own)

    runs, missing_of = defaultdict(dict), {}
    for part in STUDY.parts:
        if part.tswitch is None:
            steps, every = length(part)
            found, missing_of[part.name] = read_part(root, STUDY, part, steps, steps // every)
            for scoring, methods in found.items():
                runs[scoring].update(methods)

    def part_of(table_name: str) -> SeededPart:
        """The part whose runs a table's first row is."""
        return STUDY.method(STUDY.table(table_name).rows[0][0])[0]

    def sweep_folders_of(methods) -> list[Path]:
        folders = []
        for key in methods:
            part, sweep, method = STUDY.method(key)
            folders.append(root / f"{sweep.folder_of(method)}_steps{length(part)[0]}")
        return folders

    def command(part: SeededPart) -> str:
        steps, every = length(part)
        custom = (args.steps is not None and steps != STUDY.steps_of(part)) or args.snapshot_every is not None
        env = f"STEPS={steps} SNAPSHOT_EVERY={every} " if custom else ""
        return f"{env}bash scripts/digits_seeds.sh {part.name}"

    written, not_written = [], []

    def out_folder(part: SeededPart) -> Path:
        return Path(args.out or f"docs/results/seeds_steps{length(part)[0]}")

    def write(part: SeededPart, name: str, text: str, figure=None, figure_name: str | None = None) -> None:
        out = out_folder(part)
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
        written.append(str(out / name))
        if figure is not None:
            figure.tight_layout()
            figure.savefig(out / figure_name, dpi=120)
            plt.close(figure)
            written.append(str(out / figure_name))
        print(text)

    # Table 1 and Figure 4: best snapshot per run, one scoring of every snapshot.
    table1, figure4_k, figure4_n = (dict(STUDY.table(name).rows) for name in ("table1", "figure4_top",
                                                                              "figure4_bottom"))
    part1 = part_of("table1")
    scoring1 = part1.scorings[0].key
    steps1 = length(part1)[0]
    report_command = "python scripts/seeded_report.py" + (f" --steps {args.steps}" if args.steps else "") + (
        f" --snapshot-every {args.snapshot_every}" if args.snapshot_every else "")
    if any(runs[scoring1].get(key) for key in table1):
        note = missing_note(missing_of[part1.name])
        figure, axis = plt.subplots(figsize=(6, 4))
        plot(axis, runs[scoring1], table1, f"Table 1 on digits, {steps1} steps: mean and min-max over seeds")
        write(part1, "table1.md", f"# Table 1 at small scale, seeded ({steps1} steps of 128)\n\n"
              + table(runs[scoring1], table1) + "\n\nFID against images seen, mean [min, max] over seeds:\n\n"
              + curves_table(runs[scoring1], table1) + note + "\n\n"
              + provenance(sweep_folders_of(table1), [command(part1), report_command]) + "\n",
              figure, "table1_fid.png")
    else:
        not_written.append(f"table1: no finished run; missing: {'; '.join(missing_of[part1.name])}")
    part4 = STUDY.part("figure4")
    if any(runs[scoring1].get(key) for key in (*figure4_k, *figure4_n) if key not in table1):
        note = missing_note(missing_of[part1.name] + missing_of[part4.name])
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        plot(axes[0], runs[scoring1], figure4_k, f"KNN search size k (n 64), {steps1} steps")
        plot(axes[1], runs[scoring1], figure4_n, f"KNN samples n (k 256), {steps1} steps")
        write(part4, "figure4.md", f"# Figure 4 at small scale, seeded ({steps1} steps of 128)\n\n"
              + "k sweep (n 64):\n\n" + table(runs[scoring1], figure4_k)
              + "\n\n" + curves_table(runs[scoring1], figure4_k) + "\n\nn sweep (k 256):\n\n"
              + table(runs[scoring1], figure4_n) + "\n\n" + curves_table(runs[scoring1], figure4_n) + note + "\n\n"
              + provenance(sweep_folders_of({**figure4_k, **figure4_n}),
                           [command(part1), command(part4), report_command]) + "\n",
              figure, "figure4.png")
    else:
        not_written.append(f"figure4: no finished run of its own; missing: {'; '.join(missing_of[part4.name])}")

    # Table 2: the final snapshot per run, at each Heun step count; FID against images seen at the curve's.
    table2 = dict(STUDY.table("table2").rows)
    part2 = part_of("table2")
    steps2 = length(part2)[0]
    curve = next(scoring.key for scoring in part2.scorings if not scoring.last_only)
    if any(runs[scoring.key].get(key) for scoring in part2.scorings for key in table2):
        figure, axis = plt.subplots(figsize=(6, 4))
        plot(axis, runs[curve], table2, f"Table 2 on digits ({curve}), {steps2} steps: mean and min-max over seeds")
        write(part2, "table2.md", f"# Table 2 at small scale, seeded ({steps2} steps of 128)\n\n"
              "At the final snapshot, per sampler (heunN: Heun with N steps, 2N - 1 network evaluations), mean ± "
              "std over seeds (seeds: how many each sampler has scored). FID in the digits classifier's features:"
              "\n\n" + final_table(runs, table2, part2.scorings, "fid") + "\n\nIS:\n\n"
              + final_table(runs, table2, part2.scorings, "isc") + "\n\nMemorisation share (%: samples nearer a "
              "training image than a third of the distance to the second nearest):\n\n"
              + final_table(runs, table2, part2.scorings, "memorised")
              + f"\n\nFID ({curve}) against images seen, mean [min, max] over seeds:\n\n"
              + curves_table(runs[curve], table2) + missing_note(missing_of[part2.name]) + "\n\n"
              + provenance(sweep_folders_of(table2), [command(part2), report_command]) + "\n",
              figure, "table2_fid.png")
    else:
        not_written.append(f"table2: no finished run; missing: {'; '.join(missing_of[part2.name])}")

    # Figure 5: each seed's t_switch sweep.
    part5 = next(part for part in STUDY.parts if part.tswitch is not None)
    figure5 = dict(STUDY.table("figure5").rows)
    sweeps, missing5 = read_tswitch(root, STUDY, part5, length(part5)[0])
    if sweeps:
        network = part5.tswitch
        alone = runs[curve].get(network.method, {})
        alone_line = (f"The networks alone ({curve}, Table 2's {network.method} runs, final snapshot): FID "
                      f"{mean_std([c[-1].fid for c in alone.values()])} ({len(alone)} seeds).\n\n" if alone else "")
        figure, axis = plt.subplots(figsize=(6, 4))
        plot_tswitch(axis, sweeps, figure5, f"Figure 5 on digits: mean and min-max over {len(sweeps)} seeds")
        folders = [run_dir.parent for _, run_dir in network_runs(STUDY, network, length(part5)[0], root)]
        write(part5, "figure5.md", f"# Figure 5 at small scale, seeded ({len(sweeps)} seeds of {network.part}'s "
              f"{network.method} network, {length(part5)[0]} steps)\n\n" + alone_line
              + "FID against t_switch (the estimator or the forward process above t_switch, the network below), "
              "mean ± std over seeds:\n\n" + tswitch_table(sweeps, figure5, "fid")
              + "\n\nMemorisation share (%) against t_switch:\n\n"
              + tswitch_table(sweeps, figure5, "fraction_memorised", 100.0, 1) + missing_note(missing5) + "\n\n"
              + provenance(folders, [command(part2), command(part5), report_command]) + "\n",
              figure, "figure5.png")
    else:
        not_written.append(f"figure5: no t_switch sweep; missing: {'; '.join(missing5)}")

    for line in not_written:
        print(f"not written: {line}", file=sys.stderr)
    if not written:  # an empty table would replace the one a finished study wrote
        sys.stderr.write(f"error: no finished run under {root.absolute()} for any table of the seeded study; "
                         f"nothing written\nhint: bash scripts/digits_seeds.sh trains and scores them "
                         f"(docs/reproducing.md)\n")
        sys.exit(1)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
