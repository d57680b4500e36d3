"""Where SB3 PPO's time goes on the batched env, and how near its update runs to this CPU's arithmetic.

    python benchmarks/sb3_update_parts.py [--threads 1] [--cycles 5] [--num-envs 256] [--json PATH]

For the bench's PPO (``gfenv.bench.sb3_ppo_agent``: hyperparams/ppo.yml on the default task, N slots, live
encoders), per rollout of N x n_steps transitions, the median over cycles of one run each, in turn:
- ``env``: the batched env alone, stepped n_steps times with random cells (what the bench's ``batched`` measures);
- ``collect``: PPO's ``collect_rollouts`` (the env, the SB3 adapter, the policy's forward, the rollout buffer);
- ``update``: PPO's ``train()`` on that rollout (n_epochs passes of mini-batches: forward, backward, Adam);
- the update's multiply-adds, counted by ``torch.utils.flop_counter`` over one ``train()`` (FLOPs / 2), and the rate
  it runs at; beside it, ``torch.mm`` at the shape of the policy's largest linear layer on a mini-batch and at
  1024 x 1024 x 1024, and the extractor's 3 x 3 convolution forward on a mini-batch: what this core gives such
  arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from gymnasium.vector.vector_env import AutoresetMode
from torch.utils.flop_counter import FlopCounterMode


def _seconds(fn, calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _macs_per_second(macs: float, fn, calls: int = 20) -> float:
    fn()
    return macs / statistics.median(_seconds(fn) for _ in range(calls))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gfenv import GlanceFocusVectorEnv
    from gfenv.bench import sb3_ppo_agent, vector_env_workload
    from gfenv.utils import keep_freed_memory

    keep_freed_memory()
    agent = sb3_ppo_agent(args.num_envs, "cpu")
    model = agent.model
    n_steps, transitions = model.n_steps, args.num_envs * model.n_steps
    _, callback = model._setup_learn(transitions, None)  # resets the env, as learn() does
    callback.on_training_start(locals(), globals())

    def collect() -> None:
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=n_steps)

    env = GlanceFocusVectorEnv(num_envs=args.num_envs, action="grid", seed=0, autoreset_mode=AutoresetMode.SAME_STEP,
                               model=model.env.venv.base.model)
    env_run = vector_env_workload(env, -(-n_steps // (env.steps - 1)))  # whole episodes covering n_steps steps
    per_step = n_steps / (env_run.steps / args.num_envs)  # the share of that run a rollout's steps take

    collect()
    with FlopCounterMode(display=False) as counter:
        model.train()
    update_macs = counter.get_total_flops() / 2
    parts: dict[str, list[float]] = {"env": [], "collect": [], "update": []}
    for _ in range(args.cycles):
        parts["env"].append(_seconds(env_run.run) * per_step)
        parts["collect"].append(_seconds(collect))
        parts["update"].append(_seconds(model.train))
    med = {k: statistics.median(v) for k, v in parts.items()}

    batch = int(model.batch_size)
    head = model.policy.features_extractor.head[0]
    a, b = torch.randn(batch, head.in_features), torch.randn(head.in_features, head.out_features)
    big = torch.randn(1024, 1024)
    conv = model.policy.features_extractor.glance_net[2]
    conv_in = torch.randn(batch, conv.in_channels, *model.policy.features_extractor.glance_map_shape[1:])
    conv_macs = conv_in.shape[0] * conv_in[0, 0].numel() * conv.out_channels * conv.weight[0].numel()
    with torch.no_grad():
        rates = {"update": update_macs / med["update"],
                 "mm_policy_layer": _macs_per_second(batch * head.in_features * head.out_features,
                                                     lambda: a @ b),
                 "mm_1024": _macs_per_second(1024**3, lambda: big @ big),
                 "conv3x3_forward": _macs_per_second(conv_macs, lambda: conv(conv_in))}

    learn = med["collect"] + med["update"]
    print(f"PPO (hyperparams/ppo.yml, default task), N = {args.num_envs}, {args.threads} thread(s), "
          f"median of {args.cycles} cycles; one rollout = {transitions} transitions")
    print(f"  env alone ({n_steps} batched steps)      {med['env']:7.3f} s")
    print(f"  collection (collect_rollouts)        {med['collect']:7.3f} s   env / collection = "
          f"{med['env'] / med['collect']:.2f}")
    print(f"  update (train(): {model.n_epochs} epochs, batch {batch}) {med['update']:7.3f} s   "
          f"update / env = {med['update'] / med['env']:.2f}")
    print(f"  learn = collection + update          {learn:7.3f} s   env / learn = {med['env'] / learn:.2f}")
    print(f"update: {update_macs / 1e9:.2f} G multiply-adds ({update_macs / transitions / 1e6:.2f} M per transition) "
          f"at {rates['update'] / 1e9:.1f} G/s")
    print(f"torch.mm {batch} x {head.in_features} @ {head.in_features} x {head.out_features}: "
          f"{rates['mm_policy_layer'] / 1e9:.1f} G/s; 1024^3: {rates['mm_1024'] / 1e9:.1f} G/s; "
          f"the 3 x 3 convolution's forward on a mini-batch: {rates['conv3x3_forward'] / 1e9:.1f} G/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_envs": args.num_envs, "threads": args.threads, "transitions": transitions,
                       "seconds": parts, "median_seconds": med, "update_macs": update_macs,
                       "macs_per_second": rates}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
