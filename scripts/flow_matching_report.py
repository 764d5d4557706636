"""Seeded flow-matching results on digits from the run folders of scripts/flow_matching_seeds.sh
(docs/flow_matching.md).

    python scripts/flow_matching_report.py [--root multirun/train] [--steps 400] \
        [--out docs/results/flow_matching_digits_steps400]

Reads ``<root>/digits_fm{,_stf,_knn}_steps<steps>/seed=S/evaluation.csv`` (every EMA snapshot, Euler at the curve's
step count; its last snapshot is also the NFE sweep's point at that step count) and
``.../seed=S/last/evaluation.csv`` (the last snapshot at the other Euler and the Heun step counts) and writes into
``--out``:
- table.md: per method and sampler setting (NFE), FID / IS / memorisation share as mean ± std over seeds (sample
  std, ddof 1) with each seed's FID; the FID-against-images-seen table (mean [min, max] over seeds); and a
  paired comparison per seed (the same seed shares data order, initial weights and sampling noise);
- fid_nfe.png: FID against NFE (Euler and Heun), seeds' mean with a min-max band per method;
- fid_images.png: FID against images seen.
A seed counts for a setting only when it was scored; missing runs and settings are listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

METHODS = {"digits_fm": "FM (single-sample: eps - x)", "digits_fm_stf": "FM + STF (n 64)",
           "digits_fm_knn": "FM + KNN (k 256, n 64)"}
SEEDS = (0, 1, 2)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("fid") not in (None, "")]


def nfe(sampler: str, num_steps: int) -> int:
    """Network evaluations of the flow samplers (a network is defined at t = 0: Heun costs 2 per step)."""
    return num_steps if sampler == "flow_euler" else 2 * num_steps


def collect(root: Path, steps: int, curve_steps: int):
    """(sweeps, curves, missing): sweeps[method][(sampler, num_steps)][seed] = row of the last snapshot;
    curves[method][seed] = [(images_seen, fid)] over snapshots with Euler at ``curve_steps`` steps."""
    sweeps = defaultdict(lambda: defaultdict(dict))
    curves = defaultdict(dict)
    missing = []
    for method in METHODS:
        for seed in SEEDS:
            folder = root / f"{method}_steps{steps}" / f"seed={seed}"
            curve_rows = [row for row in read_csv(folder / "evaluation.csv") if row["sampler"] == "flow_euler"
                          and json.loads(row["sampler_settings"])["num_steps"] == curve_steps]
            if curve_rows:
                curves[method][seed] = sorted((int(r["images_seen"]), float(r["fid"])) for r in curve_rows)
                for row in curve_rows:  # the curve's last snapshot is also the NFE sweep's Euler point
                    if int(row["step"]) == steps:
                        sweeps[method][("flow_euler", curve_steps)][seed] = row
            last_rows = read_csv(folder / "last" / "evaluation.csv")
            if not last_rows:
                missing.append(f"{folder} (last snapshot not scored)")
            for row in last_rows:
                settings = json.loads(row["sampler_settings"])
                sweeps[method][(row["sampler"], int(settings["num_steps"]))][seed] = row
    return sweeps, curves, missing


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sweep_table(sweeps) -> str:
    settings = sorted({key for method in sweeps.values() for key in method}, key=lambda k: (k[0], k[1]))
    lines = ["| sampler | NFE | method | seeds | FID (mean ± std) | IS | memorised share | nearest distance | "
             "per seed FID |", "|---|---|---|---|---|---|---|---|---|"]
    for sampler, num_steps in settings:
        for method, label in METHODS.items():
            rows = sweeps.get(method, {}).get((sampler, num_steps), {})
            if not rows:
                continue
            fids = [float(rows[s]["fid"]) for s in sorted(rows)]
            iscs = [float(rows[s]["isc_mean"]) for s in sorted(rows) if rows[s].get("isc_mean")]
            copies = [float(rows[s]["fraction_memorised"]) for s in sorted(rows) if rows[s].get("fraction_memorised")]
            nearest = [float(rows[s]["mean_nearest_distance"]) for s in sorted(rows)
                       if rows[s].get("mean_nearest_distance")]
            per_seed = ", ".join(f"s{s}: {float(rows[s]['fid']):.2f}" for s in sorted(rows))
            name = f"{'Euler' if sampler == 'flow_euler' else 'Heun'} {num_steps}"
            lines.append(f"| {name} | {nfe(sampler, num_steps)} | {label} | {len(rows)} | {mean_std(fids)} | "
                         f"{mean_std(iscs)} | {mean_std(copies, 3)} | {mean_std(nearest, 3)} | {per_seed} |")
    return "\n".join(lines)


def paired_table(sweeps) -> str:
    """Per seed, FID of STF and KNN minus the single-sample FID at each setting (negative: better)."""
    settings = sorted({key for method in sweeps.values() for key in method}, key=lambda k: (k[0], k[1]))
    lines = ["| sampler | NFE | STF - single, per seed | KNN - single, per seed | KNN - STF, per seed |",
             "|---|---|---|---|---|"]
    for sampler, num_steps in settings:
        fid = {method: {s: float(r["fid"]) for s, r in sweeps.get(method, {}).get((sampler, num_steps), {}).items()}
               for method in METHODS}

        def differences(a: str, b: str, fid: dict = fid) -> str:
            seeds = sorted(set(fid[a]) & set(fid[b]))
            return ", ".join(f"{fid[a][s] - fid[b][s]:+.2f}" for s in seeds)

        name = f"{'Euler' if sampler == 'flow_euler' else 'Heun'} {num_steps}"
        lines.append(f"| {name} | {nfe(sampler, num_steps)} | {differences('digits_fm_stf', 'digits_fm')} | "
                     f"{differences('digits_fm_knn', 'digits_fm')} | {differences('digits_fm_knn', 'digits_fm_stf')} |")
    return "\n".join(lines)


def curve_table(curves) -> str:
    images = sorted({point[0] for method in curves.values() for curve in method.values() for point in curve})
    lines = ["| method | " + " | ".join(f"{n / 1000:.1f}k" for n in images) + " |",
             "|---|" + "---|" * len(images)]
    for method, label in METHODS.items():
        cells = []
        for n in images:
            values = [fid for curve in curves.get(method, {}).values() for seen, fid in curve if seen == n]
            cells.append(f"{statistics.mean(values):.1f} [{min(values):.1f}, {max(values):.1f}]" if values else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(sweeps, curves, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from knn_cm.io import save_figure

    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method, label in METHODS.items():
        for sampler, style in (("flow_euler", "-o"), ("flow_heun", "--s")):
            points = sorted((nfe(sampler, k[1]), [float(r["fid"]) for r in rows.values()])
                            for k, rows in sweeps.get(method, {}).items() if k[0] == sampler and rows)
            if not points:
                continue
            x = [p[0] for p in points]
            axis.plot(x, [statistics.mean(p[1]) for p in points], style, color=colours[method], markersize=4,
                      label=f"{label}, {'Euler' if sampler == 'flow_euler' else 'Heun'}")
            axis.fill_between(x, [min(p[1]) for p in points], [max(p[1]) for p in points], color=colours[method],
                              alpha=0.12, linewidth=0)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("network evaluations (NFE)")
    axis.set_ylabel("FID (digits features)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title("Flow matching on digits: FID against NFE (3 seeds, min-max band)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, out / "fid_nfe.png")

    figure, axis = plt.subplots(figsize=(6.0, 4.0))
    for method, label in METHODS.items():
        runs = curves.get(method, {})
        images = sorted({seen for curve in runs.values() for seen, _ in curve})
        if not images:
            continue
        values = [[fid for curve in runs.values() for seen, fid in curve if seen == n] for n in images]
        axis.plot([n / 1000 for n in images], [statistics.mean(v) for v in values], "-o", color=colours[method],
                  markersize=4, label=label)
        axis.fill_between([n / 1000 for n in images], [min(v) for v in values], [max(v) for v in values],
                          color=colours[method], alpha=0.15, linewidth=0)
    axis.set_yscale("log")
    axis.set_xlabel("images seen (thousands)")
    axis.set_ylabel("FID (digits features)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, out / "fid_images.png")


def training_set_reference() -> float:
    """Mean pixel-space distance from each digits training image to its nearest other training image (the scale of
    ``nearest distance``: samples much closer than this sit on training images)."""
    import torch

    from knn_cm.data import load_digits

    images = load_digits().float().reshape(1797, -1).to(torch.float64)
    distances = torch.cdist(images, images)
    distances.fill_diagonal_(float("inf"))
    return float(distances.min(dim=1).values.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("multirun/train"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--curve-steps", type=int, default=4, help="Euler steps of the FID-against-images curve")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"docs/results/flow_matching_digits_steps{args.steps}")
    out.mkdir(parents=True, exist_ok=True)
    sweeps, curves, missing = collect(args.root, args.steps, args.curve_steps)
    text = [f"# Flow matching on digits, seeded ({args.steps} steps of 128)", "",
            f"Made by `STEPS={args.steps} bash scripts/flow_matching_seeds.sh` (train, then score: evaluate.py) and "
            f"`python scripts/flow_matching_report.py --steps {args.steps}`; protocol and discussion: "
            "[../../flow_matching.md](../../flow_matching.md).", "",
            "FID / IS in the digits classifier's feature space, the share of samples that copy a training image "
            "(nearest / second-nearest distance < 1/3) and the mean pixel-space distance to the nearest training "
            "image, at the last snapshot (for scale: a training image's mean distance to its nearest other training "
            f"image is {training_set_reference():.3f}):", "", sweep_table(sweeps), "",
            "Paired by seed (same data order, initial weights and sampling noise), FID differences:", "",
            paired_table(sweeps), "",
            f"FID against images seen (Euler, {args.curve_steps} steps), mean [min, max] over seeds:", "",
            curve_table(curves), ""]
    if missing:
        text += ["Missing:", ""] + [f"- {item}" for item in missing] + [""]
    (out / "table.md").write_text("\n".join(text))
    plot(sweeps, curves, out)
    print("\n".join(text))


if __name__ == "__main__":
    main()
