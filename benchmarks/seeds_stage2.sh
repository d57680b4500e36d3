#!/usr/bin/env bash
# Stage-2 runs of the learned agents, 3 seeds each, into runs/seeds/<agent>_s<seed>; then the table, with
#   python evaluate_agent.py --agents random,center,oracle,ppo=runs/seeds/ppo_s{seed},... --seeds 0,1,2 --episodes 1000
# (the full command is in docs/results.md). SEEDS="0" runs one seed of the second loop only.
cd "$(dirname "$0")/.."
for seed in 0 1 2; do
  .venv/bin/python train_agent.py --stage 2 --agent ppo --timesteps 60000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/ppo_s$seed
  .venv/bin/python train_agent.py --stage 2 --agent maskable_ppo --timesteps 60000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/maskable_ppo_s$seed
  .venv/bin/python train_agent.py --stage 2 --agent recurrent_ppo --timesteps 30000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/recurrent_ppo_s$seed
  .venv/bin/python train_agent.py --stage 2 --agent gfnet_ppo --timesteps 30000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/gfnet_ppo_s$seed
done
# The other learned agents, budgets sized to about 3 min a run on the shared 2-core CPU. One torch thread: with the
# CPU shared, two threads made TRPO 5x slower (100 s against 20 s for 3,072 timesteps).
export OMP_NUM_THREADS=1
for seed in ${SEEDS:-0 1 2}; do
  nice -n 10 .venv/bin/python train_agent.py --stage 2 --agent trpo --timesteps 30000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/trpo_s$seed
  nice -n 10 .venv/bin/python train_agent.py --stage 2 --agent a2c --timesteps 60000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/a2c_s$seed
  nice -n 10 .venv/bin/python train_agent.py --stage 2 --agent qrdqn --timesteps 30000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/qrdqn_s$seed
  nice -n 10 .venv/bin/python train_agent.py --stage 2 --agent sac --timesteps 15000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/sac_s$seed
  nice -n 10 .venv/bin/python train_agent.py --stage 2 --agent ars --timesteps 200000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/ars_s$seed
done
