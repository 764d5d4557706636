"""Run folders -> the paper's tables and figures (Table 1, Table 2, Figure 4, Figure 5).

Everything is read from run folders (``config.yaml``, ``metrics.jsonl``, ``evaluation.jsonl``,
``tswitch.csv``), never from memory. A run that does not exist is reported as missing, one that has not
finished as partial (fewer steps than configured) or not evaluated yet; nothing is filled in. Each row that
is not complete carries its reason (``reason``: the folder looked for, the steps done, the command that
evaluates it), and :func:`report_summary` says what was written and why each missing piece is missing.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from knn_cm import paper
from knn_cm.evaluation.records import settings_key
from knn_cm.io import atomic_path, save_figure, write_csv_rows
from knn_cm.runs.binding import invocation_seconds
from knn_cm.runs.jsonl import read_json_lines
from knn_cm.runs.layout import RunLayout

TABLE_FIELDS = ("method", "status", "best_step", "images_seen_mimg", "fid", "isc", "num_samples",
                "feature_extractor", "training_hours", "steps_done", "steps_planned")
# The tables and figures, their runs (folder name = experiment) and the paper's numbers: knn_cm/paper.py.
SCALES = ("paper", "digits", "toy")
TOY_NOTE = "digits, tiny networks, a few steps: a check of the pipeline, not a result"


def _planned_steps(run_dir: Path) -> int | None:
    config = RunLayout(run_dir).config
    if not config.exists():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(config).get("trainer", {}).get("max_steps")


def training_hours(metrics: Sequence[Mapping]) -> float:
    """Training hours from metrics records (each covers the steps since the previous one): the estimate for
    run folders without ``invocations.jsonl``, which count the steps of a killed invocation only once."""
    seconds, previous = 0.0, 0
    for record in metrics:
        seconds += (record["step"] - previous) * record.get("seconds_per_step", 0.0)
        previous = record["step"]
    return seconds / 3600


def comparable_evaluations(run_dir: Path) -> list[dict]:
    """The FID records of one evaluation setting: the run's snapshots scored alike.

    Records group by everything but the snapshot (:func:`~knn_cm.evaluation.records.settings_key`:
    sampler and its settings, estimator, seeds, sample count, extractor, metrics), so a best FID is never
    taken across samplers or sample counts. The group chosen has the largest sample count, then covers
    the most snapshots, then holds the latest record.
    """
    groups: dict[str, list[dict]] = {}
    latest: dict[str, int] = {}
    for position, record in enumerate(read_json_lines(RunLayout(run_dir).evaluations)):
        if record.get("fid") is not None:
            key = settings_key(record)
            groups.setdefault(key, []).append(record)
            latest[key] = position
    if not groups:
        return []

    def preference(key):
        snapshots = {(record.get("network"), record.get("step")) for record in groups[key]}
        return groups[key][0]["num_samples"], len(snapshots), latest[key]

    return groups[max(groups, key=preference)]


def summarise_run(run_dir: str | Path, label: str | None = None) -> dict:
    """A table row for one run folder: the minimum-FID record of its :func:`comparable_evaluations`."""
    run_dir = Path(run_dir)
    row = {"method": label or run_dir.name, "run": str(run_dir)}
    if not run_dir.is_dir():
        return row | {"status": "missing", "reason": f"no run folder at {run_dir.resolve()}"}
    metrics = read_json_lines(RunLayout(run_dir).metrics)
    steps_done = metrics[-1]["step"] if metrics else 0
    planned = _planned_steps(run_dir)
    wall_seconds = invocation_seconds(run_dir)  # every invocation, replayed steps included
    hours = wall_seconds / 3600 if wall_seconds is not None else training_hours(metrics)  # older run folders
    row |= {"steps_done": steps_done, "steps_planned": planned, "training_hours": round(hours, 3)}
    evaluations = comparable_evaluations(run_dir)
    if evaluations:
        best = min(evaluations, key=lambda r: r["fid"])
        count = best["num_samples"]
        images = best.get("images_seen")
        row |= {"best_step": best["step"], "fid": best["fid"], "isc": best.get("isc_mean"), "num_samples": count,
                "feature_extractor": best.get("feature_extractor"),
                "images_seen_mimg": None if images is None else round(images / 1e6, 3)}
    finished = planned is not None and steps_done >= planned
    row["status"] = "complete" if finished and evaluations else (
        "not evaluated yet" if finished else f"partial: {steps_done} of {planned} steps"
        + ("" if evaluations else ", not evaluated"))
    evaluate = f"python evaluate.py run_dir={run_dir.resolve()}"
    if not finished:
        row["reason"] = (f"partial: {steps_done} of {planned} steps at {run_dir.resolve()} (its train.py command, "
                         f"run again, continues)" + ("" if evaluations else f", then {evaluate}"))
    elif not evaluations:
        row["reason"] = f"not evaluated yet: {evaluate}"
    return row


def table(rows: Sequence[Mapping], title: str) -> str:
    """Markdown table of run summaries, with the paper's numbers beside ours."""
    lines = [f"### {title}", "", "| method | FID | IS | samples | best checkpoint (Mimg) | training hours | status |"
             " paper FID / IS |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fid = f"{row['fid']:.3f}" if row.get("fid") is not None else "-"
        isc = f"{row['isc']:.2f}" if row.get("isc") is not None else "-"
        reported = paper.reported(Path(row.get("run", "")).name)
        lines.append(f"| {row['method']} | {fid} | {isc} | {row.get('num_samples') or '-'} "
                     f"({row.get('feature_extractor') or '-'}) | {row.get('images_seen_mimg', '-')} | "
                     f"{row.get('training_hours', '-')} | {row['status']} | "
                     f"{f'{reported.fid:.2f} / {reported.isc:.2f}' if reported else '-'} |")
    return "\n".join(lines)


def write_table(rows: Sequence[Mapping], folder: Path, name: str, title: str) -> None:
    write_csv_rows(folder / f"{name}.csv", TABLE_FIELDS, rows)
    with atomic_path(folder / f"{name}.md") as temp:
        temp.write_text(table(rows, title) + "\n")


def fid_curves(run_dirs: Mapping[str, Path]) -> dict[str, list[tuple[float, float]]]:
    """label -> [(million images seen, FID)] from each run's :func:`comparable_evaluations`."""
    curves = {}
    for label, run_dir in run_dirs.items():
        curves[label] = sorted((r["images_seen"] / 1e6, r["fid"]) for r in comparable_evaluations(Path(run_dir))
                               if r.get("images_seen") is not None)
    return curves


def plot_figure4(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str,
                 baseline: str | None = None) -> None:
    """FID against training images, one line per run; horizontal lines at each run's minimum; runs without
    evaluations are listed as missing in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if not points:
            axis.plot([], [], " ", label=f"{label} (missing)")
            continue
        line, = axis.plot(*zip(*points), "-o", markersize=3, label=label, linewidth=2 if label == baseline else 1)
        axis.axhline(min(fid for _, fid in points), color=line.get_color(), linestyle=":", linewidth=0.8)
    axis.set_xlabel("training images (M)")
    axis.set_ylabel("FID")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def sweep_runs(sweep_dir: str | Path) -> dict[str, Path]:
    """label -> run folder for every job of a Hydra multirun sweep folder (labels: the override dirname)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return {}
    return {child.name: child for child in sorted(sweep_dir.iterdir()) if RunLayout(child).config.exists()}


def build_report(train_root: str | Path, out: str | Path, multirun_root: str | Path | None = None,
                 tswitch_dir: str | Path | None = None, scale: str = "paper") -> dict:
    """Write Table 1 / Table 2 (markdown + CSV), Figure 4 and Figure 5 PNGs into ``out``; returns the rows. A
    Figure 4 panel is drawn only when one of its runs has an evaluation (``report_summary`` says why not otherwise).

    ``scale="digits"`` reports the small-scale CPU runs instead (Table 1 from the digits experiments);
    ``scale="toy"`` the paper's run folders as the toy campaign fills them (scripts/campaign.py --scale toy:
    digits, tiny networks, a few steps), titled so.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    train_root, out = Path(train_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    tables = [(spec, spec.title) for spec in paper.TABLES]
    if scale == "digits":
        tables = [(paper.TABLE1_DIGITS, paper.TABLE1_DIGITS.title)]
    elif scale == "toy":
        tables = [(spec, f"{spec.title.split(':')[0]} at toy scale ({TOY_NOTE})") for spec in paper.TABLES]
    for spec, title in tables:
        rows = [summarise_run(train_root / method.experiment, method.label) for method in spec.methods]
        write_table(rows, out, spec.name, title)
        result[spec.name] = rows
    if multirun_root is not None:
        baseline = paper.FIGURE4.baseline
        for panel in paper.FIGURE4.panels:
            runs = {baseline.label: train_root / baseline.experiment}
            runs |= sweep_runs(Path(multirun_root) / panel.experiment)
            curves = fid_curves(runs)
            if any(curves.values()):  # a figure only from data: without an evaluated run there is nothing to draw
                plot_figure4(curves, out / f"{panel.experiment}.png", panel.title, baseline=baseline.label)
            result[panel.experiment] = curves
    if tswitch_dir is not None:
        csv_path = RunLayout(tswitch_dir).tswitch_table
        if csv_path.exists():
            from knn_cm.evaluation.tswitch import plot_tswitch

            with open(csv_path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            for row in rows:
                for key in ("t_switch", "fid", "num_samples"):
                    row[key] = float(row[key]) if row.get(key) not in (None, "") else None
            plot_tswitch(rows, out / f"{paper.FIGURE5.name}.png")
            if csv_path.resolve() != RunLayout(out).tswitch_table.resolve():  # the sweep's own CSV beside the figure
                shutil.copyfile(csv_path, RunLayout(out).tswitch_table)
            result[paper.FIGURE5.name] = rows
        else:
            result[paper.FIGURE5.name] = "missing"
    return result


def report_summary(result: Mapping, out: str | Path, train_root: str | Path, multirun_root: str | Path | None = None,
                   tswitch_dir: str | Path | None = None, scale: str = "paper") -> list[str]:
    """What :func:`build_report` wrote (absolute paths) and why each missing row or figure is missing.

    Lines to print after a report: ``wrote FOLDER: files``, one line per row or figure that is not complete
    (``<table> <method>: <reason>``), and, when every paper-scale run is missing but digits runs exist,
    the ``--scale digits`` command that reports them.
    """
    out, train_root = Path(out).resolve(), Path(train_root)
    written, problems = [], []
    for spec in (*paper.TABLES, paper.TABLE1_DIGITS):
        rows = result.get(spec.name)
        if not isinstance(rows, list) or f"{spec.name}.md" in written:
            continue
        written += [f"{spec.name}.md", f"{spec.name}.csv"]
        problems += [f"{spec.name} {row['method']}: {row['reason']}" for row in rows if row.get("reason")]
    for panel in paper.FIGURE4.panels:
        if panel.experiment not in result:
            continue
        drawn = any(result[panel.experiment].values())
        if drawn:
            written.append(f"{panel.experiment}.png")
        sweep = Path(multirun_root) / panel.experiment
        state = "" if drawn else "not drawn, "
        if not sweep_runs(sweep):
            problems.append(f"{panel.experiment}: {state}" + (f"no run folders in {sweep.resolve()}" if sweep.is_dir()
                                                                else f"no sweep folder at {sweep.resolve()}"))
        elif not drawn:
            problems.append(f"{panel.experiment}: not drawn, no run of {sweep.resolve()} has been evaluated "
                            f"(python evaluate.py run_dir=RUN for each)")
    figure5 = result.get(paper.FIGURE5.name)
    if isinstance(figure5, list):
        written += [f"{paper.FIGURE5.name}.png", RunLayout(out).tswitch_table.name]
    elif figure5 == "missing":
        problems.append(f"{paper.FIGURE5.name}: no {RunLayout(tswitch_dir).tswitch_table.name} at "
                        f"{RunLayout(tswitch_dir).tswitch_table.resolve()}")
    elif tswitch_dir is None:
        problems.append(f"{paper.FIGURE5.name}: not drawn; pass --tswitch <output folder of evaluate.py "
                        f"experiment={paper.FIGURE5.experiment}>")
    lines = [f"wrote {out}: {', '.join(written)}"]
    if problems:
        lines += ["not complete:"] + [f"  {problem}" for problem in problems]
    paper_rows = [row for spec in paper.TABLES for row in result.get(spec.name) or [] if isinstance(row, dict)]
    digits_runs = [m.experiment for m in paper.TABLE1_DIGITS.methods if (train_root / m.experiment).is_dir()]
    if scale == "paper" and paper_rows and all(row["status"] == "missing" for row in paper_rows) and digits_runs:
        train = "" if train_root == Path("outputs/train") else f" --train {train_root}"
        lines.append(f"no paper-scale run folder exists in {train_root.resolve()}, but digits runs do "
                     f"({', '.join(digits_runs)}): python scripts/report.py --scale digits{train}")
    return lines
