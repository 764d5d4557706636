#!/usr/bin/env bash
# Seeded small-scale evidence on digits (docs/reproducing.md): Table 1 (iCT, iCT + STF, iCT + KNN) with
# 3 seeds each, then Figure 4 at digits scale (KNN k in {16, 64, 256} at n 64 and n in {16, 64} at k 256,
# 2 seeds each; the k 256 / n 64 point and the iCT baseline are Table 1's runs, 3 seeds).
# Each part is one Hydra sweep (local launcher: one job after another, seed-major so an interrupted sweep
# leaves balanced methods; run folders named by the swept values), then every EMA snapshot of every run is
# scored: digits-feature FID / IS on 2,000 one-step samples. Re-running resumes (trainer.resume=auto;
# evaluation.jsonl).
#
#   bash scripts/digits_seeds.sh            # everything: 15 runs of 6-14 min on 2 CPU cores (Table 1 measured: 81 min)
#   bash scripts/digits_seeds.sh table1     # Table 1: multirun/train/{digits_ict,digits_ict_stf,quickstart}_steps1600/seed=S
#   bash scripts/digits_seeds.sh figure4    # Figure 4's 6 other runs: multirun/train/digits_figure4_{k,n}_steps1600/...
#   bash scripts/digits_seeds.sh evaluate   # score the finished runs only
#   STEPS=400 SNAPSHOT_EVERY=100 bash scripts/digits_seeds.sh table1   # shorter runs (the curriculum and the
#                                           # cosine lr follow the run length), folders *_steps400
#   python scripts/seeded_report.py [--steps 400 --snapshot-every 100]  # tables and plots from what finished
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NICE=${NICE:-nice -n 19}
STEPS=${STEPS:-1600}                 # the quickstart's length
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-400}
what=${1:-all}
LENGTH=(trainer.max_steps="$STEPS" trainer.snapshot_every="$SNAPSHOT_EVERY" trainer.progress=false)
TABLE1=(multirun/train/digits_ict_steps"$STEPS" multirun/train/digits_ict_stf_steps"$STEPS"
        multirun/train/quickstart_steps"$STEPS")
FIGURE4=(multirun/train/digits_figure4_k_steps"$STEPS" multirun/train/digits_figure4_n_steps"$STEPS")

evaluate() {  # evaluate SWEEP_FOLDER...: score every finished run folder in them
  for sweep in "$@"; do
    for dir in "$sweep"/*/; do
      dir=${dir%/}
      [[ -f $dir/snapshots/network-$(printf %09d "$STEPS").pt ]] || { echo "skip $dir (unfinished)"; continue; }
      echo "[$(date +%T)] evaluate $dir"
      # quoted for Hydra: sweep folder names hold '=' and ',' (e.g. estimator.k=16,seed=0)
      $NICE "$PYTHON" evaluate.py "run_dir='$dir'" metrics.feature_extractor=digits num_samples=2000 progress=false \
        "hydra.run.dir='$dir/evaluate'"
    done
  done
}

if [[ $what == all || $what == table1 ]]; then
  echo "[$(date +%T)] Table 1 sweep"
  $NICE "$PYTHON" train.py -m seed=0,1,2 experiment=digits_ict,digits_ict_stf,quickstart \
    'run_name=${hydra:runtime.choices.experiment}_steps${trainer.max_steps}' "${LENGTH[@]}"
  evaluate "${TABLE1[@]}"
fi
if [[ $what == all || $what == figure4 ]]; then
  echo "[$(date +%T)] Figure 4 sweeps"
  $NICE "$PYTHON" train.py -m seed=0,1 estimator.k=16,64 experiment=quickstart run_name=digits_figure4_k_steps"$STEPS" \
    "${LENGTH[@]}"
  $NICE "$PYTHON" train.py -m seed=0,1 experiment=quickstart run_name=digits_figure4_n_steps"$STEPS" estimator.n=16 \
    "${LENGTH[@]}"
  evaluate "${FIGURE4[@]}"
fi
if [[ $what == evaluate ]]; then
  evaluate "${TABLE1[@]}" "${FIGURE4[@]}"
fi
echo "[$(date +%T)] done"
