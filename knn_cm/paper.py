"""The paper's results and the runs that make them: one manifest, as plain data.

Each table and figure this project reproduces, with the experiments (``configs/<app>/experiment/<name>.yaml``) and run
folders that make it, what the paper reports (FID / IS, Table 4's training hours), and the small-scale
counterparts on digits, among them the seeded study of ``scripts/digits_seeds.sh``. The readers:

- ``knn_cm/report.py``: the tables' rows and titles, Figure 4's panels, Figure 5, the paper's numbers;
- ``knn_cm/launch/campaign.py``: one training job per run of Table 1, Table 2 and Figure 4, Figure 5's job;
- ``knn_cm/launch/cost.py``: Table 4, the basis of every cost;
- ``scripts/digits_seeds.py`` (``digits_seeds.sh``) and ``scripts/seeded_report.py``: the seeded sweeps, their run
  folders and tables;
- ``benchmarks/bench_training.py``: Table 4's time ratios beside the measured ones.

None of them spells these lists (tests/unit/paper/test_paper.py checks). Values of a swept setting live where
Hydra reads them: ``hydra.sweeper.params`` of the sweep's experiment file. Run folders are named by the experiment
(``run_name`` defaults to it, configs/train/train.yaml): ``outputs/train/<experiment>``, and for a sweep
``multirun/train/<experiment>/<key>=<value>``.

    python -m knn_cm.paper            # every table and figure with the experiments that make it
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------------
# The paper's scale: CIFAR-10 on A100 nodes.


@dataclass(frozen=True)
class Method:
    """One row of a results table: a training run and, for the paper's tables, what the paper reports."""

    label: str  # the row's name in the report
    experiment: str  # configs/train/experiment/<experiment>.yaml; the run folder is outputs/train/<experiment>
    fid: float | None = None  # the paper's FID (50,000 samples, Inception features), None where it reports none
    isc: float | None = None  # the paper's Inception score


@dataclass(frozen=True)
class Table:
    """A results table: one row per method, each the minimum-FID snapshot of its run."""

    name: str  # the report's file stem: <name>.md, <name>.csv
    title: str
    methods: tuple[Method, ...]


@dataclass(frozen=True)
class SweepPanel:
    """One panel of an ablation figure: FID against training images, one line per value of a swept setting.

    The values are ``hydra.sweeper.params`` of ``configs/train/experiment/<experiment>.yaml`` (one key), the runs
    ``multirun/train/<experiment>/<key>=<value>`` (``python train.py -m experiment=<experiment>``), the figure
    ``<experiment>.png``.
    """

    experiment: str
    title: str


@dataclass(frozen=True)
class AblationFigure:
    """Figure 4: sweeps of the KNN estimator's settings against one baseline run, drawn on every panel."""

    baseline: Method
    panels: tuple[SweepPanel, ...]


@dataclass(frozen=True)
class TSwitchFigure:
    """Figure 5: FID against t_switch of hybrid sampling (``python evaluate.py experiment=<experiment>
    tswitch.network=FILE``), with the network of a trained run by default, and its digits counterpart."""

    name: str  # the report's file stem
    experiment: str  # evaluate.py's experiment; its output folder is outputs/evaluate/<experiment>
    network_run: str  # whose final EMA snapshot the campaign samples with (a Table 2 run)
    digits_experiment: str  # the same sweep on digits with digits_network_run's network
    digits_network_run: str


@dataclass(frozen=True)
class TrainingTime:
    """One row of the paper's Table 4: total hours on one A100 node (8 GPUs) of a Table 1 run."""

    experiment: str
    estimator: str  # the run's estimator (estimator.name): the cost basis of other runs with this estimator
    node_hours: float
    time_vs_ict: float  # the paper's "Training Time vs iCT" column, as printed (1.17 = 117%)


@dataclass(frozen=True)
class TrainingTimes:
    """The paper's Table 4: the Table 1 runs as configured there (CIFAR-10, ``steps`` at ``batch_size``)."""

    steps: int
    batch_size: int
    runs: tuple[TrainingTime, ...]


@dataclass(frozen=True)
class EstimatorFigure:
    """A figure of the estimator study: ``python evaluate_estimators.py experiment=<experiment>``."""

    name: str
    title: str
    experiment: str  # configs/estimator_study/experiment/<experiment>.yaml, e.g. figure3


TABLE1 = Table("table1", "Table 1: one-step CIFAR-10 consistency models", (
    Method("iCT (reimplemented)", "ict", fid=3.67, isc=9.45),
    Method("iCT + STF", "ict_stf", fid=3.79, isc=9.50),
    Method("iCT + KNN (ours)", "ict_knn", fid=3.59, isc=9.49)))
TABLE2 = Table("table2", "Table 2: EDM on CIFAR-10 with different score estimators", (
    Method("EDM", "edm", fid=2.01, isc=9.76),
    Method("STF", "edm_stf", fid=1.94, isc=9.81),
    Method("EDM + KNN (ours)", "edm_knn", fid=1.96, isc=9.87)))
TABLES = (TABLE1, TABLE2)
FIGURE4 = AblationFigure(Method("iCT baseline", "figure4_baseline"), (
    SweepPanel("figure4_k", "Figure 4 (top): KNN search size k"),
    SweepPanel("figure4_n", "Figure 4 (bottom): estimator sample size n")))
FIGURE5 = TSwitchFigure("figure5", "tswitch_sweep", network_run="edm", digits_experiment="tswitch_digits",
                        digits_network_run="digits_edm")
TABLE4 = TrainingTimes(steps=400_000, batch_size=1024, runs=(
    TrainingTime("ict", "single", 188.9, 1.0),
    TrainingTime("ict_knn", "knn", 220.5, 1.17),
    TrainingTime("ict_stf", "stf", 185.8, 0.983)))
ESTIMATOR_FIGURES = (
    EstimatorFigure("figure3", "Figure 3: estimator error on CIFAR-10", "figure3"),
    EstimatorFigure("figure6", "Figure 6: KNN error against k at n 256", "figure6_k_sweep"),
    EstimatorFigure("figure7", "Figure 7: KNN error against k at n 64", "figure7_k_sweep"),
    EstimatorFigure("figure10", "Figure 10: estimators on CelebA 64x64", "celeba64"),
    EstimatorFigure("figure11", "Figure 11: estimators on ImageNet 64x64", "imagenet64"),
    EstimatorFigure("figure12", "Figure 12: approximate against exact nearest neighbours",
                    "figure12_approximate"))

# ---------------------------------------------------------------------------------------------------------------
# Small scale on CPU: scikit-learn's digits, 0.75M-parameter networks, FID / IS in the digits classifier's features.

TABLE1_DIGITS = Table("table1", "Table 1 at small scale: one-step consistency models on digits (CPU)", (
    Method("iCT", "digits_ict"), Method("iCT + STF", "digits_ict_stf"),
    Method("iCT + KNN (quickstart)", "quickstart")))
ESTIMATOR_FIGURE3_REDUCED = EstimatorFigure(
    "figure3_reduced", "Figure 3's protocol at reduced size (M 256, R 16)", "cifar10_reduced")


@dataclass(frozen=True)
class SeededMethod:
    """One method of a seeded study: an experiment with a few overrides, trained once per seed."""

    key: str  # the seeded report's name for it
    experiment: str
    overrides: tuple[str, ...] = ()  # key=value beyond the experiment, e.g. estimator.k=16


@dataclass(frozen=True)
class SeededSweep:
    """One ``python train.py -m`` (the local launcher: one run after another): every seed x every method.

    The methods are a grid: several experiments with the same overrides, or one experiment with each value of
    one override key. Seeds vary slowest, so an interrupted sweep leaves balanced methods. Run folders are
    ``<root>/<folder>_steps<steps>/<swept key=value,...>`` (the stable sweeper names them by the swept values,
    the seed included, not the experiment); ``folder`` None names each experiment's sweep folder after it.
    """

    seeds: tuple[int, ...]
    methods: tuple[SeededMethod, ...]
    folder: str | None = None

    def __post_init__(self) -> None:
        experiments = {method.experiment for method in self.methods}
        if len({tuple(o.partition("=")[0] for o in method.overrides) for method in self.methods}) > 1:
            raise ValueError(f"seeded sweep of {sorted(experiments)}: every method must override the same keys "
                             "(a grid)")
        if self.folder is None and any(method.overrides != self.methods[0].overrides for method in self.methods):
            raise ValueError(f"seeded sweep of {sorted(experiments)}: methods of several experiments must share "
                             "their overrides")
        if self.folder is not None and len(experiments) != 1:
            raise ValueError(f"seeded sweep {self.folder}: one experiment per named sweep folder, got {experiments}")
        if len(self.swept()) > 1:
            raise ValueError(f"seeded sweep {self.folder}: one swept override key, got {self.swept()}")

    def swept(self) -> dict[str, tuple[str, ...]]:
        """override key -> its values, for the keys whose value differs between the methods (in order)."""
        values: dict[str, list[str]] = {}
        for method in self.methods:
            for override in method.overrides:
                key, _, value = override.partition("=")
                values.setdefault(key, [])
                if value not in values[key]:
                    values[key].append(value)
        return {key: tuple(found) for key, found in values.items() if len(found) > 1}

    def folder_of(self, method: SeededMethod) -> str:
        """The sweep folder's stem (without ``_steps<steps>``) that holds ``method``'s runs."""
        return self.folder or method.experiment

    def swept_values(self, method: SeededMethod) -> tuple[tuple[str, str], ...]:
        """``method``'s values of the swept keys other than the seed: how its run folders' names tell it apart."""
        swept = self.swept()
        return tuple(sorted(tuple(o.partition("=")[::2]) for o in method.overrides if o.partition("=")[0] in swept))

    def run_name(self, method: SeededMethod, seed: int) -> str:
        """The name of ``method``'s run folder for ``seed`` in its sweep folder, as the stable sweeper names it
        (hydra_plugins/knn_cm_sweeper): the swept ``key=value`` pairs but the experiment, sorted by key."""
        items = [*self.swept_values(method), *((("seed", str(seed)),) if len(self.seeds) > 1 else ())]
        return ",".join(f"{key}={value}" for key, value in sorted(items))


@dataclass(frozen=True)
class SeededScoring:
    """One scoring of a part's finished runs: ``evaluate.py`` with the study's evaluation and these overrides."""

    key: str  # the seeded report's name for it
    overrides: tuple[str, ...] = ()  # e.g. sampler.num_steps=8
    last_only: bool = False  # the final snapshot alone, through <run>/last (the run's config.yaml and a hard link
    #                          to the snapshot: the same digest); otherwise every snapshot, in the run folder


@dataclass(frozen=True)
class SeededTSwitch:
    """A t_switch sweep per seed (``python evaluate.py experiment=<experiment> tswitch.network=<snapshot>``) with
    the final snapshot of each seed's run of ``method`` of part ``part``; it writes ``<run>/<folder>/tswitch.csv``."""

    experiment: str
    part: str
    method: str
    folder: str = "tswitch"


@dataclass(frozen=True)
class SeededPart:
    """One part of a seeded study, run by ``digits_seeds.sh <name>``: its sweeps, then scoring their runs.

    ``minutes`` and ``score_minutes`` are measured wall-clock ranges on 2 CPU cores, of training one run and of
    scoring it (of one seed's t_switch sweep for a t_switch part), from the runs docs/reproducing.md lists: the
    cost the dry-run prints. None: not measured.
    """

    name: str
    title: str
    sweeps: tuple[SeededSweep, ...]
    steps: int | None = None  # run length; None: the study's
    snapshot_every: int | None = None  # None: the study's
    scorings: tuple[SeededScoring, ...] = (SeededScoring("snapshots"),)
    tswitch: SeededTSwitch | None = None  # t_switch sweeps on another part's runs (a part without sweeps)
    minutes: tuple[float, float] | None = None
    score_minutes: tuple[float, float] | None = None


@dataclass(frozen=True)
class SeededTable:
    """A table (and plot) of the seeded report: (method key, row label) in order."""

    name: str
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SeededStudy:
    """Seeded runs at small scale: parts of sweeps over seeds, every EMA snapshot scored, tables over seeds."""

    parts: tuple[SeededPart, ...]
    tables: tuple[SeededTable, ...]
    steps: int  # default run length (trainer.max_steps); folders are named by it
    snapshot_every: int  # default trainer.snapshot_every: steps // snapshot_every snapshots per finished run
    evaluation: tuple[str, ...]  # evaluate.py overrides scoring each run folder's snapshots
    root: str = "multirun/train"  # where the sweeps' folders are (hydra.sweep.dir of configs/train/train.yaml)

    def sweeps(self) -> tuple[SeededSweep, ...]:
        return tuple(sweep for part in self.parts for sweep in part.sweeps)

    def part(self, name: str) -> SeededPart:
        return next(part for part in self.parts if part.name == name)

    def steps_of(self, part: SeededPart) -> int:
        return part.steps or self.steps

    def snapshot_every_of(self, part: SeededPart) -> int:
        return part.snapshot_every or self.snapshot_every

    def method(self, key: str) -> tuple[SeededPart, SeededSweep, SeededMethod]:
        """The part, sweep and method of method key ``key``."""
        return next((part, sweep, method) for part in self.parts for sweep in part.sweeps
                    for method in sweep.methods if method.key == key)

    def table(self, name: str) -> SeededTable:
        return next(table for table in self.tables if table.name == name)


# Table 1 on digits with 3 seeds, then Figure 4 at digits scale (3 seeds): KNN k 16 / 64 at n 64 and n 16 at
# k 256; the k 256 / n 64 point and the iCT baseline are Table 1's runs. Table 2 on digits: EDM with the standard,
# STF and KNN targets (3 seeds, digits_edm's 2,000 steps), every snapshot scored with Heun at EDM's 18 steps, the
# last also at 4 and 8. Figure 5 with 3 seeds: the t_switch sweep on each seed's digits EDM network.
DIGITS_SEEDS = SeededStudy(
    parts=(SeededPart("table1", "Table 1", (
               SeededSweep((0, 1, 2), (SeededMethod("ict", "digits_ict"), SeededMethod("ict_stf", "digits_ict_stf"),
                                       SeededMethod("ict_knn", "quickstart"))),),
               minutes=(6, 14), score_minutes=(0.5, 1.5)),
           SeededPart("figure4", "Figure 4", (
               SeededSweep((0, 1, 2), (SeededMethod("knn_k16_n64", "quickstart", ("estimator.k=16",)),
                                       SeededMethod("knn_k64_n64", "quickstart", ("estimator.k=64",))),
                           folder="digits_figure4_k"),
               SeededSweep((0, 1, 2), (SeededMethod("knn_k256_n16", "quickstart", ("estimator.n=16",)),),
                           folder="digits_figure4_n")),
               minutes=(6, 14), score_minutes=(0.5, 1.5)),
           SeededPart("table2", "Table 2", (
               SeededSweep((0, 1, 2), (SeededMethod("edm", FIGURE5.digits_network_run),
                                       SeededMethod("edm_stf", "digits_edm_stf"),
                                       SeededMethod("edm_knn", "digits_edm_knn"))),),
               steps=2000, snapshot_every=500,  # digits_edm's length, 4 snapshots
               scorings=(SeededScoring("heun4", ("sampler.kind=heun", "sampler.num_steps=4"), last_only=True),
                         SeededScoring("heun8", ("sampler.kind=heun", "sampler.num_steps=8"), last_only=True),
                         SeededScoring("heun18", ("sampler.kind=heun", "sampler.num_steps=18"))),
               minutes=(3, 10.5), score_minutes=(1.5, 3.5)),
           SeededPart("figure5", "Figure 5", (), tswitch=SeededTSwitch(FIGURE5.digits_experiment, "table2", "edm"),
                      score_minutes=(4.5, 10))),
    tables=(SeededTable("table1", (("ict", "iCT (single-sample, Euler)"), ("ict_stf", "iCT + STF (n 64, Heun)"),
                                   ("ict_knn", "iCT + KNN (k 256, n 64, Heun)"))),
            SeededTable("figure4_top", (("ict", "iCT"), ("knn_k16_n64", "KNN k 16"), ("knn_k64_n64", "KNN k 64"),
                                        ("ict_knn", "KNN k 256"))),  # Figure 4's panels: k at n 64 (top),
            SeededTable("figure4_bottom", (("ict", "iCT"), ("knn_k256_n16", "KNN n 16"),  # n at k 256 (bottom)
                                           ("ict_knn", "KNN n 64"))),
            SeededTable("table2", (("edm", "EDM (standard target)"), ("edm_stf", "EDM + STF (n 64)"),
                                   ("edm_knn", "EDM + KNN (k 256, n 64)"))),
            SeededTable("figure5", (("knn", "KNN, then the network"), ("stf", "STF, then the network"),
                                    ("forward", "forward process, then the network")))),  # tswitch_digits' methods
    steps=1600, snapshot_every=400,  # the quickstart's length and snapshots
    evaluation=("metrics.feature_extractor=digits", "num_samples=2000", "progress=false"))
# Beyond the paper: flow matching on digits with the single-sample (eps - x), STF and KNN targets,
# 3 seeds each, at a quarter of the quickstart's length (docs/flow_matching.md); scored at several Euler / Heun
# step counts besides these overrides. scripts/flow_matching_seeds.sh and flow_matching_report.py still spell
# these runs; they read this entry once moved onto it, as digits_seeds.py and seeded_report.py read DIGITS_SEEDS.
FLOW_MATCHING_SEEDS = SeededStudy(
    parts=(SeededPart("train", "Flow matching", (
        SeededSweep((0, 1, 2), (SeededMethod("digits_fm", "digits_fm"), SeededMethod("digits_fm_stf", "digits_fm_stf"),
                                SeededMethod("digits_fm_knn", "digits_fm_knn"))),)),),
    tables=(SeededTable("table", (("digits_fm", "FM (single-sample: eps - x)"), ("digits_fm_stf", "FM + STF (n 64)"),
                                  ("digits_fm_knn", "FM + KNN (k 256, n 64)"))),),
    steps=400, snapshot_every=100,
    evaluation=("metrics.feature_extractor=digits", "num_samples=1000", "progress=false"))
SEEDED_STUDIES = {"digits": DIGITS_SEEDS, "flow_matching": FLOW_MATCHING_SEEDS}


# ---------------------------------------------------------------------------------------------------------------
# Lookups and the listing.


def reported(experiment: str) -> Method | None:
    """The paper's row for the run of ``experiment`` (its FID / IS), or None where the paper has none."""
    return next((method for table in TABLES for method in table.methods
                 if method.experiment == experiment and method.fid is not None), None)


def training_experiments() -> tuple[str, ...]:
    """The single training runs of the paper's scale, in the campaign's order: Table 1, Table 2, Figure 4's baseline."""
    return (*(method.experiment for table in TABLES for method in table.methods), FIGURE4.baseline.experiment)


def experiments() -> set[str]:
    """Every experiment the manifest names (``configs/<app>/experiment/<name>.yaml``), at every scale."""
    names = {*training_experiments(), *(panel.experiment for panel in FIGURE4.panels), FIGURE5.experiment,
             FIGURE5.network_run, FIGURE5.digits_experiment, FIGURE5.digits_network_run,
             *(method.experiment for method in TABLE1_DIGITS.methods),
             *(figure.experiment for figure in (*ESTIMATOR_FIGURES, ESTIMATOR_FIGURE3_REDUCED)),
             *(method.experiment for study in SEEDED_STUDIES.values() for sweep in study.sweeps()
               for method in sweep.methods),
             *(part.tswitch.experiment for study in SEEDED_STUDIES.values() for part in study.parts if part.tswitch)}
    return names


def describe() -> str:
    """The manifest as text: each result, the experiments that make it and what the paper reports."""
    lines = []
    for table in TABLES:
        lines.append(table.title)
        lines += [f"  {m.label:<22} experiment={m.experiment:<10} paper FID {m.fid:.2f} / IS {m.isc:.2f}"
                  for m in table.methods]
    lines.append(f"Figure 4: baseline experiment={FIGURE4.baseline.experiment}; sweeps: "
                 + ", ".join(f"python train.py -m experiment={panel.experiment}" for panel in FIGURE4.panels))
    lines.append(f"Figure 5: python evaluate.py experiment={FIGURE5.experiment} "
                 f"tswitch.network=<{FIGURE5.network_run}'s final snapshot>; digits: "
                 f"experiment={FIGURE5.digits_experiment} with {FIGURE5.digits_network_run}'s")
    lines.append(f"Table 4 (A100-node hours, {TABLE4.steps:,} steps at batch {TABLE4.batch_size}): "
                 + ", ".join(f"{run.experiment} {run.node_hours}" for run in TABLE4.runs))
    lines += [f"{figure.title}: python evaluate_estimators.py experiment={figure.experiment}"
              for figure in (*ESTIMATOR_FIGURES, ESTIMATOR_FIGURE3_REDUCED)]
    lines.append(TABLE1_DIGITS.title + ": " + ", ".join(f"experiment={m.experiment}" for m in TABLE1_DIGITS.methods))
    for name, study in SEEDED_STUDIES.items():
        for part in study.parts:
            for sweep in part.sweeps:
                methods = ", ".join(f"{m.key} (experiment={m.experiment}{''.join(' ' + o for o in m.overrides)})"
                                    for m in sweep.methods)
                lines.append(f"seeded {name} {part.name}: seeds {list(sweep.seeds)}: {methods}")
            if part.tswitch is not None:
                lines.append(f"seeded {name} {part.name}: python evaluate.py experiment={part.tswitch.experiment} "
                             f"with each seed's {part.tswitch.part} run of {part.tswitch.method}")
    return "\n".join(lines)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(describe())


if __name__ == "__main__":
    main()
