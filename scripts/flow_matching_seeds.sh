#!/usr/bin/env bash
# Seeded flow-matching evidence on digits (docs/flow_matching.md): flow matching with the single-sample target
# (eps - x), STF's (n 64) and KNN's (k 256, n 64), 3 seeds each: experiments digits_fm, digits_fm_stf,
# digits_fm_knn. One Hydra sweep per method (local launcher: one seed after another; the three sweeps side by
# side), then evaluate.py scores every run in the digits classifier's feature space (FID, IS, memorisation share):
#   - every EMA snapshot with Euler at CURVE_STEPS steps (FID against images seen);
#   - the last snapshot at 1, 2, 4, 8 and 16 Euler steps and HEUN_STEPS Heun steps (FID against NFE). To score
#     one snapshot only, evaluate.py gets a folder <run>/last holding the run's config.yaml and a hard link to
#     that snapshot (the same bytes, so the same digest as in the run folder).
# Re-running resumes (trainer.resume=auto; evaluation.jsonl keys each evaluation by its settings).
#
#   bash scripts/flow_matching_seeds.sh              # train, then evaluate
#   bash scripts/flow_matching_seeds.sh train        # the 9 runs: multirun/train/digits_fm{,_stf,_knn}_steps$STEPS/seed=S
#   bash scripts/flow_matching_seeds.sh train_one digits_fm_knn 0,1   # one method's sweep over some seeds
#   bash scripts/flow_matching_seeds.sh evaluate     # score the finished runs (evaluate_one EXPERIMENT: one method)
#   STEPS=1600 SNAPSHOT_EVERY=400 WARMUP_IMAGES=25600 bash scripts/flow_matching_seeds.sh   # the quickstart's length
#   python scripts/flow_matching_report.py --steps $STEPS   # tables and figures from what finished
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NICE=${NICE:-nice -n 10}
STEPS=${STEPS:-400}                  # the budget docs/flow_matching.md gives for the shared 2-core CPU
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-100}
WARMUP_IMAGES=${WARMUP_IMAGES:-6400} # 1/8 of the run, as digits_fm's 200 of 1,600 steps
NUM_SAMPLES=${NUM_SAMPLES:-1000}
CURVE_STEPS=${CURVE_STEPS:-4}
EULER_STEPS=${EULER_STEPS:-"1 2 4 8 16"}
HEUN_STEPS=${HEUN_STEPS:-"1 2 4 8"}
THREADS=${THREADS:-1}                # torch threads per training process
what=${1:-all}

score() {  # score RUN_FOLDER KIND STEPS
  $NICE "$PYTHON" evaluate.py "run_dir='$1'" metrics.feature_extractor=digits num_samples="$NUM_SAMPLES" \
    progress=false sampler.kind="$2" sampler.num_steps="$3" "hydra.run.dir='$1/evaluate'"
}

train() {  # train EXPERIMENT [SEEDS]: one Hydra sweep over the seeds, one run after another
  local seeds=${2:-0,1,2} settings
  settings=(experiment="$1" 'run_name=${hydra:runtime.choices.experiment}_steps${trainer.max_steps}'
            trainer.max_steps="$STEPS" trainer.snapshot_every="$SNAPSHOT_EVERY" trainer.warmup_images="$WARMUP_IMAGES"
            trainer.progress=false)
  if [[ $seeds == *,* ]]; then
    $NICE "$PYTHON" train.py -m seed="$seeds" "${settings[@]}"
  else  # one seed is not a sweep (its folder would be the sweep folder itself): name the run folder
    $NICE "$PYTHON" train.py seed="$seeds" "${settings[@]}" "hydra.run.dir='multirun/train/$1_steps$STEPS/seed=$seeds'"
  fi
}

if [[ $what == all || $what == train ]]; then
  # The three methods train side by side, one thread each: on a CPU shared with other (un-niced) work a niced
  # job's share grows with its number of threads, and the methods then see the same machine load.
  echo "[$(date +%T)] training: 3 sweeps in parallel ($STEPS steps, $THREADS thread(s) each)"
  for experiment in digits_fm digits_fm_stf digits_fm_knn; do
    OMP_NUM_THREADS=$THREADS train "$experiment" > "multirun/${experiment}_steps$STEPS.log" 2>&1 &
  done
  wait
fi
if [[ $what == train_one ]]; then   # train_one EXPERIMENT [SEEDS]
  train "$2" "${3:-0,1,2}"
fi
evaluate_method() {  # evaluate_method EXPERIMENT: score its finished runs, seed after seed
  local last dir steps
  last=$(printf %09d "$STEPS")
  for seed in 0 1 2; do
    dir=multirun/train/$1_steps$STEPS/seed=$seed
    [[ -f $dir/snapshots/network-$last.pt ]] || { echo "skip $dir (unfinished)"; continue; }
    echo "[$(date +%T)] evaluate $dir"
    score "$dir" flow_euler "$CURVE_STEPS"          # every snapshot; its last row is also the NFE sweep's point
    mkdir -p "$dir/last/snapshots"
    cp "$dir/config.yaml" "$dir/last/config.yaml"
    ln -f "$dir/snapshots/network-$last.pt" "$dir/last/snapshots/network-$last.pt"
    for steps in $EULER_STEPS; do
      [[ $steps == "$CURVE_STEPS" ]] || score "$dir/last" flow_euler "$steps"
    done
    for steps in $HEUN_STEPS; do score "$dir/last" flow_heun "$steps"; done
  done
}

if [[ $what == all || $what == evaluate ]]; then
  # One scoring process per method, side by side (as training), each one seed after another.
  for experiment in digits_fm digits_fm_stf digits_fm_knn; do
    evaluate_method "$experiment" > "multirun/${experiment}_steps${STEPS}_evaluate.log" 2>&1 &
  done
  wait
fi
if [[ $what == evaluate_one ]]; then   # evaluate_one EXPERIMENT
  evaluate_method "$2"
fi
echo "[$(date +%T)] done"
