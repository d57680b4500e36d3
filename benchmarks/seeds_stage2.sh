#!/usr/bin/env bash
# Stage-2 runs of the agents that issue 3 requires to beat random, 3 seeds each; summarise with
# python benchmarks/summarise_seeds.py, after:
#   python evaluate_agent.py --agents random,oracle --episodes 1000 --json runs/seeds/baselines_1000.json
cd "$(dirname "$0")/.."
for seed in 0 1 2; do
  .venv/bin/python train_agent.py --stage 2 --agent ppo --timesteps 60000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/ppo_s$seed
  .venv/bin/python train_agent.py --stage 2 --agent maskable_ppo --timesteps 60000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/maskable_ppo_s$seed
  .venv/bin/python train_agent.py --stage 2 --agent recurrent_ppo --timesteps 30000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/recurrent_ppo_s$seed
  .venv/bin/python train_agent.py --stage 2 --agent gfnet_ppo --timesteps 30000 --seed $seed --eval-freq 0 --eval-episodes 1000 --checkpoint-freq 0 --no-progress --run-dir runs/seeds/gfnet_ppo_s$seed
done
