#!/usr/bin/env bash
# Seeded small-scale evidence on digits (docs/reproducing.md): Table 1 (iCT, iCT + STF, iCT + KNN) with
# 3 seeds each, then Figure 4 at digits scale (KNN k in {16, 64, 256} at n 64 and n in {16, 64} at k 256,
# 3 seeds each; the k 256 / n 64 point and the iCT baseline are Table 1's runs, 3 seeds).
# Each part is one Hydra sweep (local launcher: one job after another, seed-major so an interrupted sweep
# leaves balanced methods; run folders named by the swept values), then every EMA snapshot of every run is
# scored: digits-feature FID / IS on 2,000 one-step samples. Re-running resumes (trainer.resume=auto;
# evaluation.jsonl). The runs, seeds and settings are the paper manifest's (knn_cm/paper.py, DIGITS_SEEDS);
# scripts/digits_seeds.py runs them (--dry-run prints the commands).
#
#   bash scripts/digits_seeds.sh            # everything: 18 runs of 6-14 min each on 2 CPU cores
#   bash scripts/digits_seeds.sh table1     # Table 1: multirun/train/{digits_ict,digits_ict_stf,quickstart}_steps1600/seed=S
#   bash scripts/digits_seeds.sh figure4    # Figure 4's 6 other runs: multirun/train/digits_figure4_{k,n}_steps1600/...
#   bash scripts/digits_seeds.sh evaluate   # score the finished runs only
#   STEPS=400 SNAPSHOT_EVERY=100 bash scripts/digits_seeds.sh table1   # shorter runs (the curriculum and the
#                                           # cosine lr follow the run length), folders *_steps400
#   python scripts/seeded_report.py [--steps 400 --snapshot-every 100]  # tables and plots from what finished
# PYTHON (default python) runs train.py / evaluate.py, niced by NICE (default nice -n 19).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/digits_seeds.py "$@"
