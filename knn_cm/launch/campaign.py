"""The paper's experiment campaign as SLURM jobs: every training run, their evaluations, the t_switch sweep,
and the report, chained by job dependencies (``scripts/campaign.py``; docs/slurm.md).

The runs are the paper manifest's (``knn_cm/paper.py``):

- Training (``slurm/train.sbatch``: requeued on preemption and before the time limit, ``trainer.resume=auto``):
  Table 1, Table 2, Figure 4's baseline, and one job per value of each Figure 4 sweep (``hydra.sweeper.params``
  of its experiment file, e.g. configs/train/experiment/figure4_k.yaml). Run folders are the ones ``scripts/report.py``
  reads, and a Hydra sweep would write: ``outputs/train/<experiment>`` and
  ``multirun/train/figure4_k/estimator.k=128``.
- One evaluation per training run (``python evaluate.py run_dir=<run folder>``), after it succeeded.
- Figure 5 (``python evaluate.py experiment=tswitch_sweep tswitch.network=...``): by default the final network
  of the manifest's run for it (EDM), after it succeeded; or a given network file (e.g. NVIDIA's converted
  checkpoint) at once.
- The report (``scripts/report.py``) after every evaluation ended, whether or not it succeeded (a failed
  run is reported missing). Dependents of a failed job are cancelled (``--kill-on-invalid-dep=yes``).

``scale="toy"`` runs the same jobs at digits size on CPU: dataset digits, a few-thousand-parameter network,
4 steps of 8 images with snapshots at steps 2 and 4, evaluation of 100 samples with the digits classifier's
features, the digits t_switch sweep at 3 values, one CPU per job.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from knn_cm import paper
from knn_cm.cli import APPS, CONFIGS, compose_app
from knn_cm.io import atomic_path
from knn_cm.launch.cost import Cost, heun_evaluations, sampling_cost, training_cost
from knn_cm.runs.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]
SCALES = ("paper", "toy")
TRAIN_TEMPLATE = "slurm/train.sbatch"
RUN_TEMPLATE = "slurm/run.sbatch"
# Resources per job kind beyond each template's defaults (train.sbatch: 1 node x 8 GPUs, 64 CPUs, 480G, 24 h).
RESOURCES = {
    "paper": {"train": (), "evaluate": ("--gpus-per-node=1", "--cpus-per-task=8", "--mem=64G", "--time=24:00:00"),
              "report": ("--cpus-per-task=2", "--mem=8G", "--time=01:00:00")},
    "toy": {"train": ("--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G", "--time=00:15:00"),
            "evaluate": ("--cpus-per-task=1", "--mem=2G", "--time=00:15:00"),
            "report": ("--cpus-per-task=1", "--mem=2G", "--time=00:15:00")},
}
TOY_TRAIN = ("dataset=digits", "trainer.batch_size=8", "trainer.max_steps=4", "trainer.snapshot_every=2",
             "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.sample_every=null",
             "trainer.num_sample_images=4", "trainer.progress=false", "trainer.device=cpu")
TOY_EVALUATE = ("metrics.feature_extractor=digits", "num_samples=100", "batch_size=100", "device=cpu",
                "progress=false")
TOY_TSWITCH = (f"experiment={paper.FIGURE5.digits_experiment}", "num_samples=100", "batch_size=100", "device=cpu",
               "progress=false", "tswitch.t_switch=[0.0,1.0,80.0]")


@dataclass(frozen=True)
class TrainingRun:
    """One training job: its label (the report's folder name), experiment, run folder and overrides."""

    label: str
    experiment: str
    run_dir: str
    overrides: tuple[str, ...]
    is_edm: bool
    estimator: str
    max_steps: int
    batch_size: int
    snapshot_every: int | None


@dataclass(frozen=True)
class CampaignJob:
    """One sbatch submission: ``sbatch [resources] [dependency] TEMPLATE ARGUMENTS...``."""

    name: str  # the SLURM job name, unique in the campaign
    kind: str  # train | evaluate | tswitch | report
    template: str
    arguments: tuple[str, ...]
    resources: tuple[str, ...]
    after: tuple[str, ...] = ()  # names of the jobs this one waits for
    dependency: str = "afterok"  # afterok (their results are its input) | afterany (the report)
    cost: Cost = field(default_factory=lambda: Cost(None, "-", False))
    run_dir: str | None = None


def _compose(app: str, overrides_list: list[list[str]]) -> list:
    """One composed config of ``app`` per override list."""
    return [compose_app(app, overrides) for overrides in overrides_list]


def sweep_values(experiment: str) -> tuple[str, list[str]]:
    """(key, values) of an experiment's one-parameter sweep (hydra.sweeper.params in its config file)."""
    params = OmegaConf.load(CONFIGS / APPS["train.py"] / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    if len(params) != 1:
        raise ValueError(f"experiment {experiment} sweeps {dict(params)}; the campaign expects one parameter")
    key, values = next(iter(params.items()))
    return str(key), [value.strip() for value in str(values).split(",")]


def _training_run(label: str, experiment: str, output_root: str, run_name: str, swept: list[str], config,
                  scale: str) -> TrainingRun:
    """A run from its paper-scale config; at toy scale with the toy overrides (and their step counts)."""
    is_edm = config.trainer.objective._target_.endswith("EDMObjective")
    toy = ()
    if scale == "toy":
        toy = TOY_TRAIN + (f"model={'ddpmpp_tiny' if is_edm else 'ncsnpp_tiny'}",) + (
            ("trainer.warmup_images=0",) if is_edm else ("trainer.objective.s1=20",))  # EDM: no 10 Mimg warm-up
    toy_trainer = OmegaConf.from_dotlist([o for o in toy if o.startswith("trainer.")]).trainer if toy else {}
    trainer = OmegaConf.merge(config.trainer, toy_trainer)
    return TrainingRun(label, experiment, f"{output_root}/{run_name}",
                       (f"experiment={experiment}", override("run_name", run_name),
                        override("output_root", output_root), *swept, *toy),
                       is_edm, config.estimator.name, int(trainer.max_steps), int(trainer.batch_size),
                       trainer.snapshot_every)


def override(key: str, value: str) -> str:
    """A Hydra override ``key=value``, the value quoted when it has characters Hydra would parse (``=``)."""
    return f"{key}={value}" if re.fullmatch(r"[\w./:-]+", value) else f"{key}='{value}'"


def training_runs(root: str | Path = ".", scale: str = "paper") -> list[TrainingRun]:
    """Every training run of Table 1, Table 2 and Figure 4, in submission order."""
    _check_scale(scale)
    train_root, multirun_root = _path(root, "outputs/train"), _path(root, "multirun/train")
    specs = [(name, name, train_root, name, []) for name in paper.training_experiments()]
    for experiment in (panel.experiment for panel in paper.FIGURE4.panels):
        key, values = sweep_values(experiment)
        for value in values:  # folders named as Hydra's override_dirname in a -m sweep
            specs.append((f"{experiment}/{key}={value}", experiment, f"{multirun_root}/{experiment}", f"{key}={value}",
                          [f"{key}={value}"]))
    configs = _compose("train.py", [[f"experiment={spec[1]}", "run_name=x", *spec[4]] for spec in specs])
    return [_training_run(*spec, config, scale) for spec, config in zip(specs, configs)]


def _path(root: str | Path, relative: str) -> str:
    return relative if str(root) in ("", ".") else str(Path(root) / relative)


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")


def _job_name(kind: str, label: str) -> str:
    # figure4_k/estimator.k=128 -> figure4_k-k128
    label = label.replace("estimator.", "").replace("=", "").replace("/", "-")
    return "knn-cm-" + kind + "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", label)


def _snapshots(run: TrainingRun) -> int:
    if not run.snapshot_every:
        return 1
    return run.max_steps // run.snapshot_every + (1 if run.max_steps % run.snapshot_every else 0)


def plan(root: str | Path = ".", scale: str = "paper", tswitch_network: str | None = None) -> list[CampaignJob]:
    """Every job of the campaign, each after the jobs it depends on."""
    _check_scale(scale)
    resources, toy = RESOURCES[scale], scale == "toy"
    tswitch = f"experiment={paper.FIGURE5.experiment}"
    evaluate_config, sweep = _compose("evaluate.py", [[], list(TOY_TSWITCH) if toy else [tswitch]])
    runs = training_runs(root, scale)
    num_samples = 100 if toy else int(evaluate_config.num_samples)
    heun = heun_evaluations(int(evaluate_config.sampler.num_steps))
    jobs, evaluations = [], []
    for run in runs:
        train = _job_name("train", run.label)
        cost = training_cost(run.experiment, run.estimator, run.max_steps, run.batch_size)
        jobs.append(CampaignJob(train, "train", TRAIN_TEMPLATE, run.overrides, resources["train"],
                                cost=_toy_cost(cost, toy), run_dir=run.run_dir))
        evaluation = _job_name("eval", run.label)
        cost = sampling_cost(f"{_snapshots(run)} snapshots", num_samples, heun if run.is_edm else 1, _snapshots(run))
        jobs.append(CampaignJob(evaluation, "evaluate", RUN_TEMPLATE,
                                ("python", "evaluate.py", override("run_dir", run.run_dir),
                                 override("hydra.run.dir", f"{_path(root, 'outputs/evaluate')}/{run.label}"),
                                 *(TOY_EVALUATE if toy else ())),
                                resources["evaluate"], after=(train,), cost=_toy_cost(cost, toy), run_dir=run.run_dir))
        evaluations.append(evaluation)
    tswitch_dir = _path(root, f"outputs/evaluate/{paper.FIGURE5.experiment}")
    after = ()
    if tswitch_network is None:
        network = next(run for run in runs if run.label == paper.FIGURE5.network_run)
        tswitch_network = str(RunLayout(network.run_dir).snapshot(network.max_steps))
        after = (_job_name("train", network.label),)
    methods = len(sweep.tswitch.estimators) + (1 if sweep.tswitch.include_forward else 0)
    t_switches = 3 if toy else len(sweep.tswitch.t_switch)
    cost = sampling_cost(f"{t_switches} t_switch x {methods} methods", num_samples, heun, t_switches * methods)
    jobs.append(CampaignJob(_job_name("eval", paper.FIGURE5.experiment), "tswitch", RUN_TEMPLATE,
                            ("python", "evaluate.py", *(TOY_TSWITCH if toy else (tswitch,)),
                             override("tswitch.network", tswitch_network), override("hydra.run.dir", tswitch_dir)),
                            resources["evaluate"], after=after, cost=_toy_cost(cost, toy), run_dir=tswitch_dir))
    evaluations.append(jobs[-1].name)
    report = ("python", "scripts/report.py", "--train", _path(root, "outputs/train"), "--multirun",
              _path(root, "multirun/train"), "--tswitch", tswitch_dir, "--out", _path(root, "report"),
              *(("--scale", "toy") if toy else ()))
    jobs.append(CampaignJob(_job_name("report", "paper" if not toy else "toy"), "report", RUN_TEMPLATE, report,
                            resources["report"], after=tuple(evaluations), dependency="afterany",
                            cost=Cost(0.0, "seconds on CPU", estimate=True), run_dir=_path(root, "report")))
    return jobs


def _toy_cost(cost: Cost, toy: bool) -> Cost:
    return Cost(None, "toy scale: seconds on one CPU", estimate=True) if toy else cost


def template_options(template: str | Path) -> dict[str, str]:
    """The ``#SBATCH`` options of a template: name -> value ("" for flags)."""
    options = {}
    for line in (REPO / template).read_text().splitlines():
        if line.startswith("#SBATCH --"):
            name, _, value = line[len("#SBATCH --"):].strip().partition("=")
            options[name] = value
    return options


def effective_resources(job: CampaignJob, site_options: tuple[str, ...] = ()) -> dict[str, str]:
    """The job's sbatch options after the command line overrides the template's (the resources it asks for)."""
    options = template_options(job.template)
    for option in (*job.resources, *site_options):
        name, _, value = option.lstrip("-").partition("=")
        options[name] = value
    keep = ("partition", "account", "qos", "nodes", "ntasks", "ntasks-per-node", "gpus-per-node", "cpus-per-task",
            "mem", "time", "requeue", "signal")
    return {name: options[name] for name in keep if name in options}


def sbatch_command(job: CampaignJob, logs: str, ids: dict[str, str] | None = None,
                   site_options: tuple[str, ...] = ()) -> list[str]:
    """The sbatch command line of ``job``; ``ids`` maps job names to SLURM ids (names are shown without it)."""
    command = ["sbatch", "--parsable", f"--job-name={job.name}", f"--output={logs}/%x-%j.out", *job.resources,
               *site_options]
    if job.after:
        targets = [ids[name] if ids is not None else f"<{name}>" for name in job.after]
        command += [f"--dependency={job.dependency}:{':'.join(targets)}", "--kill-on-invalid-dep=yes"]
    return command + [job.template, *job.arguments]


def describe(jobs: list[CampaignJob], root: str | Path = ".", site_options: tuple[str, ...] = ()) -> str:
    """The dry run: every job with its command, resources, dependencies and cost; the total."""
    logs = _path(root, "logs")
    lines = [f"{len(jobs)} jobs; costs in A100-node hours (one node = 8 A100 GPUs)", ""]
    for job in jobs:
        resources = " ".join(f"{k}={v}" if v else k for k, v in effective_resources(job, site_options).items())
        lines += [f"[{job.kind}] {job.name}",
                  "    " + " ".join(_shell_quote(part) for part in sbatch_command(job, logs, None, site_options)),
                  f"    resources: {resources}",
                  f"    after: {job.dependency}:{','.join(job.after)}" if job.after else "    after: -",
                  f"    cost: {job.cost}", ""]
    paper = sum(job.cost.node_hours for job in jobs if job.cost.node_hours is not None and not job.cost.estimate)
    estimated = sum(job.cost.node_hours for job in jobs if job.cost.node_hours is not None and job.cost.estimate)
    if paper or estimated:
        lines.append(f"total: {paper + estimated:.1f} A100-node hours = {paper:.1f} from the paper's Table 4 "
                     f"+ {estimated:.1f} estimated")
    else:
        lines.append("total: toy scale (CPU), no A100 cost")
    return "\n".join(lines)


def _shell_quote(part: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./<>\[\]-]+", part):
        return part
    if not re.search(r'["$`\\!]', part):
        return f'"{part}"'
    return "'" + part.replace("'", "'\\''") + "'"


def submit(jobs: list[CampaignJob], root: str | Path = ".", site_options: tuple[str, ...] = (),
           cwd: str | Path = REPO, env: dict | None = None) -> dict[str, str]:
    """Submit every job in order (dependencies by SLURM id); job name -> id, also written to
    ``<root>/campaign.json`` (the jobs, their ids, commands and run folders)."""
    logs = _path(root, "logs")
    (Path(cwd) / logs).mkdir(parents=True, exist_ok=True)
    ids, records = {}, []
    for job in jobs:
        command = sbatch_command(job, logs, ids, site_options)
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch of {job.name} failed ({result.stderr.strip()}); submitted so far: {ids}")
        ids[job.name] = result.stdout.strip().split(";")[0]
        records.append(asdict(job) | {"job_id": ids[job.name], "command": command})
    with atomic_path(Path(cwd) / _path(root, "campaign.json")) as temp:
        temp.write_text(json.dumps(records, indent=1, default=str) + "\n")
    return ids
