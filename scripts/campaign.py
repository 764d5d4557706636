"""The paper's whole campaign on SLURM in one command: every training run of Table 1, Table 2 and Figure 4,
their evaluations, the Figure 5 t_switch sweep and the report, chained by job dependencies.

    python scripts/campaign.py --dry-run                  # each job: command, resources, dependencies, A100-node hours
    python scripts/campaign.py --partition gpu --account lab             # submit (from the repository root)
    python scripts/campaign.py --scale toy --root outputs/toy_campaign   # the same jobs at toy scale on CPU

Training jobs use slurm/train.sbatch (requeued on preemption and 300 s before the time limit; trainer.resume=auto
continues in the same run folder); evaluations and the report use slurm/run.sbatch. Run folders are those
scripts/report.py reads: <root>/outputs/train/<experiment>, <root>/multirun/train/figure4_{k,n}/estimator.{k,n}=V.
Job logs go to <root>/logs/<job name>-<id>.out; <root>/campaign.json lists the jobs and their ids.

--scale toy: digits-sized overrides (dataset digits, few-thousand-parameter networks, 4 steps of 8 images, CPU,
one CPU per job; evaluation with the digits classifier's features over 100 samples; the digits t_switch sweep
at 3 values) and `report.py --scale toy`: a test of the whole pipeline in minutes, not a result.
Costs: the paper's Table 4 where it gives them (the three Table 1 iCT runs); estimates otherwise, marked so,
with their basis (knn_cm/launch/cost.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from knn_cm.launch.campaign import SCALES, describe, plan, submit


def main(argv=None) -> dict[str, str] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="paper", choices=SCALES, help="paper (A100 nodes) or toy (digits, CPU)")
    parser.add_argument("--root", default=None,
                        help="folder of every output (default: . at paper scale, outputs/toy_campaign at toy scale)")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, submit nothing")
    parser.add_argument("--tswitch-network", default=None,
                        help="network file for Figure 5 (default: the campaign's EDM run, once it finished)")
    parser.add_argument("--partition", default=os.environ.get("KNN_CM_SLURM_PARTITION"))
    parser.add_argument("--account", default=os.environ.get("KNN_CM_SLURM_ACCOUNT"))
    parser.add_argument("--qos", default=os.environ.get("KNN_CM_SLURM_QOS"))
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else ("." if args.scale == "paper" else "outputs/toy_campaign")
    site = tuple(f"--{name}={value}" for name, value in
                 (("partition", args.partition), ("account", args.account), ("qos", args.qos)) if value)
    if args.scale == "toy":
        site += ("--export=ALL,OMP_NUM_THREADS=1",)
    missing = [name for name in ("train.py", "evaluate.py", "slurm/train.sbatch", "slurm/run.sbatch")
               if not (Path.cwd() / name).exists()]
    if missing:  # the jobs start in the submit directory and run these by relative path
        parser.error(f"run from the repository root: {', '.join(missing)} not found in {Path.cwd()}")
    jobs = plan(root, args.scale, args.tswitch_network)
    if args.dry_run:
        print(describe(jobs, root, site))
        return None
    ids = submit(jobs, root, site, cwd=Path.cwd())
    width = max(len(name) for name in ids)
    for name, job_id in ids.items():
        print(f"{job_id:>8}  {name:<{width}}")
    print(f"submitted {len(ids)} jobs; watch: squeue --me; job list: {Path(root) / 'campaign.json'}")
    return ids


if __name__ == "__main__":
    main()
