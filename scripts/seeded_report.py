"""Seeded small-scale results from the run folders of scripts/digits_seeds.sh (docs/reproducing.md).

    python scripts/seeded_report.py [--root multirun/train] [--out docs/results/seeds]

Reads every ``<root>/<sweep>/<swept values>/evaluation.csv`` (digits-feature FID / IS of each EMA snapshot) and
writes:
- table1.md: best FID and the IS at that snapshot per method, mean +- std (sample std, ddof 1) over seeds,
  with each seed's values, and the number of finished runs;
- table1_fid.png: FID against images seen, the seeds' mean with a min-max band per method;
- figure4.png / figure4.md: the same for the KNN k sweep (n 64) and n sweep (k 256) against iCT.
A run counts only when every snapshot it should have (``--snapshots``) is scored; unfinished runs are listed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from knn_cm.paper import DIGITS_SEEDS
from knn_cm.runs.layout import RunLayout

# The study's methods, tables and run folders: the paper manifest (knn_cm/paper.py).
STUDY = DIGITS_SEEDS
TABLE1, FIGURE4_K, FIGURE4_N = (dict(STUDY.table(name).rows) for name in ("table1", "figure4_top",
                                                                          "figure4_bottom"))
# (sweep folder, swept values other than the seed) -> method key; a value fixed for the whole sweep (n 16 of
# digits_figure4_n) is not in the folder names, which are then seed=S only.
SWEEPS = {(sweep.folder_of(method), sweep.swept_values(method)): method.key
          for sweep in STUDY.sweeps() for method in sweep.methods}


def read_runs(root: Path, snapshots: int, steps: int) -> tuple[dict, list[str]]:
    """method -> seed -> [(images_seen, fid, isc)] for finished runs; and the unfinished run names.

    Run folders are the sweeps' ``<root>/<sweep>_steps<steps>/<key=value,...>`` (scripts/digits_seeds.sh).
    """
    runs, unfinished = defaultdict(dict), []
    for (sweep, fixed), method in SWEEPS.items():
        sweep = f"{sweep}_steps{steps}"
        for folder in sorted((root / sweep).glob("*seed=*")):
            values = dict(item.split("=", 1) for item in folder.name.split(","))
            seed = int(values.pop("seed"))
            if tuple(sorted(values.items())) != fixed:
                continue
            path = RunLayout(folder).evaluation_table
            rows = []
            if path.exists():
                with open(path, newline="") as handle:
                    rows = [r for r in csv.DictReader(handle) if r.get("fid") not in (None, "")]
            if len(rows) < snapshots:
                unfinished.append(f"{sweep}/{folder.name} ({len(rows)} of {snapshots} snapshots scored)")
                continue
            curve = sorted((int(r["images_seen"]), float(r["fid"]), float(r["isc_mean"])) for r in rows)
            runs[method][seed] = curve
    return runs, unfinished


def best(curve):
    """(best FID, IS at that snapshot, images seen there)."""
    images, fid, isc = min(curve, key=lambda point: point[1])
    return fid, isc, images


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


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
    points = sorted({images for key in methods for curve in runs.get(key, {}).values() for images, _, _ in curve})
    lines = ["| method | " + " | ".join(f"{images / 1000:.0f}k" for images in points) + " |",
             "|---|" + "---|" * len(points)]
    for key, label in methods.items():
        seeds = runs.get(key, {})
        if not seeds:
            continue
        cells = []
        for images in points:
            values = [fid for curve in seeds.values() for seen, fid, _ in curve if seen == images]
            cells.append(f"{statistics.mean(values):.1f} [{min(values):.1f}, {max(values):.1f}]" if values else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(axis, runs, methods: dict, title: str) -> None:
    for key, label in methods.items():
        seeds = runs.get(key, {})
        if not seeds:
            continue
        points = sorted({images for curve in seeds.values() for images, _, _ in curve})
        values = [[fid for curve in seeds.values() for seen, fid, _ in curve if seen == images] for images in points]
        mean = [statistics.mean(v) for v in values]
        line, = axis.plot(points, mean, "-o", markersize=3, label=f"{label} ({len(seeds)} seeds)")
        axis.fill_between(points, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                          alpha=0.2, linewidth=0)
    axis.set_xlabel("images seen")
    axis.set_ylabel("FID (digits features, 2,000 samples)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=STUDY.root)
    parser.add_argument("--out", default=None, help="default: docs/results/seeds_steps<steps>")
    parser.add_argument("--steps", type=int, default=STUDY.steps, help="run length (STEPS of digits_seeds.sh)")
    parser.add_argument("--snapshot-every", type=int, default=STUDY.snapshot_every,
                        help="SNAPSHOT_EVERY of digits_seeds.sh")
    args = parser.parse_args(argv)
    args.snapshots = args.steps // args.snapshot_every
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, unfinished = read_runs(Path(args.root), args.snapshots, args.steps)
    out = Path(args.out or f"docs/results/seeds_steps{args.steps}")
    if not any(runs.values()):  # an empty table would replace the one a finished study wrote
        sys.stderr.write(f"error: no finished run under {Path(args.root).absolute()} for {args.steps}-step sweeps "
                         f"({len(unfinished)} unfinished); {out} is left as it is\n"
                         f"hint: bash scripts/digits_seeds.sh table1 trains and scores them (docs/reproducing.md)\n")
        sys.exit(1)
    out.mkdir(parents=True, exist_ok=True)
    note = ("\n\nUnfinished or missing runs (not counted): " + "; ".join(unfinished)) if unfinished else ""
    (out / "table1.md").write_text(f"# Table 1 at small scale, seeded ({args.steps} steps of 128)\n\n"
                                   + table(runs, TABLE1)
                                   + "\n\nFID against images seen, mean [min, max] over seeds:\n\n"
                                   + curves_table(runs, TABLE1) + note + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    plot(axis, runs, TABLE1, f"Table 1 on digits, {args.steps} steps: mean and min-max over seeds")
    figure.tight_layout()
    figure.savefig(out / "table1_fid.png", dpi=120)
    plt.close(figure)
    (out / "figure4.md").write_text(f"# Figure 4 at small scale, seeded ({args.steps} steps of 128)\n\n"
                                    + "k sweep (n 64):\n\n" + table(runs, FIGURE4_K)
                                    + "\n\n" + curves_table(runs, FIGURE4_K) + "\n\nn sweep (k 256):\n\n"
                                    + table(runs, FIGURE4_N) + "\n\n" + curves_table(runs, FIGURE4_N) + note + "\n")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot(axes[0], runs, FIGURE4_K, f"KNN search size k (n 64), {args.steps} steps")
    plot(axes[1], runs, FIGURE4_N, f"KNN samples n (k 256), {args.steps} steps")
    figure.tight_layout()
    figure.savefig(out / "figure4.png", dpi=120)
    plt.close(figure)
    print((out / "table1.md").read_text())
    print((out / "figure4.md").read_text())
    print(f"wrote {out}: table1.md, table1_fid.png, figure4.md, figure4.png")


if __name__ == "__main__":
    main()
