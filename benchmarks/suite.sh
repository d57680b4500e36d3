#!/usr/bin/env bash
# The suite's reference table: every learned agent, 3 seeds, on every embedded task, one timestep budget per task;
# then the suite evaluation (2,000 test images per task). Run folders: runs/suite/<task>/<agent>_s<seed>.
#   bash benchmarks/suite.sh                     # the whole table
#   SEEDS="0" AGENTS="ppo open_loop" TASKS="GlyphPointer-v0" bash benchmarks/suite.sh   # a part of it
#   BUDGET=512 CACHE_IMAGES=256 EPISODES=64 OUT=runs/suite_smoke bash benchmarks/suite.sh   # a smoke test
#   JOBS=2 EVAL=0 bash benchmarks/suite.sh       # two runs at a time (one per core), training only
# Each run's training seconds are appended to $OUT/times.tsv (task, agent, seed, seconds).
# Budgets: GlanceFocus-v0 100,000 (the quick task), GlyphPointer-v0 300,000, GlyphChain-v0 500,000 timesteps (the
# budgets of maskable_ppo's yml blocks, where the main job's agent learns the pointer); each agent's own
# hyperparameters otherwise. Stage-2 evaluations every 50,000 timesteps on 500 validation images keep best_model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/suite}
SEEDS=${SEEDS:-0 1 2}
TASKS=${TASKS:-GlanceFocus-v0 GlyphPointer-v0 GlyphChain-v0}
AGENTS=${AGENTS:-open_loop ppo maskable_ppo recurrent_ppo gfnet_ppo a2c trpo qrdqn}
EPISODES=${EPISODES:-2000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread a run: on a shared CPU two threads oversubscribe
declare -A STEPS=([GlanceFocus-v0]=100000 [GlyphPointer-v0]=300000 [GlyphChain-v0]=500000)
train_one() {  # task agent seed: one stage-2 run, skipped when its model is there; its seconds go to $OUT/times.tsv
  local task=$1 agent=$2 seed=$3 run=$OUT/$1/$2_s$3 t0
  { [ -f "$run/model.zip" ] || [ -f "$run/model.pt" ]; } && return 0   # done already
  rm -rf "$run"
  mkdir -p "$OUT/$task"
  local steps=${BUDGET:-${STEPS[$task]}} cache=()
  # grid agents share one disk cache of the train features per task (built by the first run, then reused)
  [ "$agent" = gfnet_ppo ] || cache=(--env-kwargs cache=disk "cache_dir=$OUT/.cache" "cache_images=${CACHE_IMAGES:-20000}")
  t0=$(date +%s)
  $PY train_agent.py --stage 2 --agent "$agent" --env "gfenv/$task" --seed "$seed" --timesteps "$steps" "${cache[@]}" \
    --eval-freq $((steps < 50000 ? 0 : 50000)) --checkpoint-freq 0 --no-progress --run-dir "$run" > "$run.log" 2>&1 \
    || { echo "failed: $run (see $run.log)"; return 255; }   # 255: xargs starts no further run
  printf '%s\t%s\t%s\t%s\n' "$task" "$agent" "$seed" "$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
}
start=$(date +%s)
mkdir -p "$OUT"
jobs=$(for task in $TASKS; do for agent in $AGENTS; do for seed in $SEEDS; do echo "$task $agent $seed"; done; done; done)
# JOBS runs at a time (default 1), one thread each, in the order above
export -f train_one; export PY OUT BUDGET CACHE_IMAGES STEPS_DEF="$(declare -p STEPS)"
echo "$jobs" | xargs -P "${JOBS:-1}" -L 1 bash -c 'eval "$STEPS_DEF"; train_one "$@"' _ || exit 1
echo "training: $(( $(date +%s) - start )) s"
[ "${EVAL:-1}" = 0 ] && exit 0   # EVAL=0: train only
agents="random,center,raster,oracle"
for agent in $AGENTS; do agents="$agents,$agent=$OUT/{env}/${agent}_s{seed}"; done
envs=$(for task in $TASKS; do printf "gfenv/%s," "$task"; done)
$PY evaluate_agent.py --suite --envs "${envs%,}" --agents "$agents" --seeds "$(echo $SEEDS | tr ' ' ',')" \
  --episodes "$EPISODES" --threshold-episodes 0 --no-progress --json "$OUT/suite.json" --markdown "$OUT/suite.md"
echo "total: $(( $(date +%s) - start )) s"
