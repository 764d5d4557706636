#!/usr/bin/env bash
# Seeded small-scale evidence on digits (docs/reproducing.md), the whole campaign in one command: Table 1 (iCT,
# iCT + STF, iCT + KNN), Figure 4 (KNN k in {16, 64, 256} at n 64 and n in {16, 64} at k 256; the k 256 / n 64
# point and the iCT baseline are Table 1's runs), Table 2 (EDM with the standard, STF and KNN targets) and
# Figure 5 (the t_switch sweep on each seed's Table 2 EDM network), 3 seeds each.
# Each part is Hydra sweeps (local launcher: one job after another, seed-major so an interrupted sweep leaves
# balanced methods; run folders named by the swept values), then every run is scored: digits-feature FID / IS
# and the memorisation share on 2,000 samples (Table 2: every snapshot with Heun at 18 steps, the last at 4
# and 8 too). Re-running the same command continues where it stopped (trainer.resume=auto; evaluation.jsonl;
# a t_switch sweep newer than its network is kept). The runs, seeds and settings are the paper manifest's
# (knn_cm/paper.py, DIGITS_SEEDS); scripts/digits_seeds.py runs them.
#
#   bash scripts/digits_seeds.sh all --dry-run   # the commands and the campaign's cost on 2 CPU cores
#   bash scripts/digits_seeds.sh                 # everything (= all): 27 training runs and 3 t_switch sweeps
#   bash scripts/digits_seeds.sh table1     # Table 1: multirun/train/{digits_ict,digits_ict_stf,quickstart}_steps1600/seed=S
#   bash scripts/digits_seeds.sh figure4    # Figure 4's other runs: multirun/train/digits_figure4_{k,n}_steps1600/...
#   bash scripts/digits_seeds.sh table2     # Table 2: multirun/train/digits_edm{,_stf,_knn}_steps2000/seed=S
#   bash scripts/digits_seeds.sh figure5    # Figure 5: multirun/train/digits_edm_steps2000/seed=S/tswitch/
#   bash scripts/digits_seeds.sh evaluate   # score the finished runs only
#   STEPS=400 SNAPSHOT_EVERY=100 bash scripts/digits_seeds.sh table1   # shorter runs (the curriculum and the
#                                           # cosine lr follow the run length), folders *_steps400
#   python scripts/seeded_report.py [--steps 400 --snapshot-every 100]  # tables and plots from what finished
# PYTHON (default python) runs train.py / evaluate.py, niced by NICE (default nice -n 19).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/digits_seeds.py "$@"
