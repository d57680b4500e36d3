"""Where SB3 PPO's time goes on the batched env, and how near its update runs to this CPU's arithmetic.

    python benchmarks/sb3_update_parts.py [--threads 1] [--cycles 5] [--num-envs 256] [--parts ppo,adapter]
                                          [--profile] [--json PATH]

``ppo``: for the bench's PPO (``gfenv.bench.sb3_ppo_agent``: hyperparams/ppo.yml on the default task, N slots, live
encoders), per rollout of N x n_steps transitions, the median over cycles of one run each, in turn:
- ``env``: the batched env alone, stepped n_steps times with random cells (what the bench's ``batched`` measures);
- ``collect``: PPO's ``collect_rollouts`` (the env, the SB3 adapter, the policy's forward, the rollout buffer);
- ``update``: PPO's ``train()`` on that rollout (n_epochs passes of mini-batches: forward, backward, Adam);
- the update's multiply-adds, counted by ``torch.utils.flop_counter`` over one ``train()`` (FLOPs / 2), and the rate
  it runs at; beside it, ``torch.mm`` at the shape of the policy's largest linear layer on a mini-batch and at
  1024 x 1024 x 1024, and the extractor's 3 x 3 convolution forward on a mini-batch: what this core gives such
  arithmetic; ``--profile`` adds torch.profiler's table of one ``train()``'s operators (CPU time).

``adapter``: what the SB3 adapter (``to_sb3``: ``SB3VecEnv`` inside ``VecMonitor``) adds to a step of the env it
wraps, on the cached-feature mode of ``gfenv/GlyphPointer-v0`` (``cache="memory"``, 512 images), where the env is
cheapest and the adapter's share largest: ms per step through the adapter and of the wrapped env alone (the same 300
random actions each, in turn, median of the cycles). It needs only ``to_sb3``, so it also runs on earlier versions.
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


def ppo_parts(num_envs: int, threads: int, cycles: int, profile: bool = False) -> dict:
    """The bench's PPO rollout in parts, its update's multiply-adds and rate, and this core's matrix rates."""
    from gfenv import GlanceFocusVectorEnv
    from gfenv.bench import sb3_collector, sb3_ppo_agent, vector_env_workload

    agent = sb3_ppo_agent(num_envs, "cpu")
    model = agent.model
    n_steps, transitions = model.n_steps, num_envs * model.n_steps
    collect = sb3_collector(model)

    env = GlanceFocusVectorEnv(num_envs=num_envs, action="grid", seed=0, autoreset_mode=AutoresetMode.SAME_STEP,
                               model=model.env.venv.base.model)
    env_run = vector_env_workload(env, -(-n_steps // (env.steps - 1)))  # whole episodes covering n_steps steps
    per_step = n_steps / (env_run.steps / num_envs)  # the share of that run a rollout's steps take

    collect()
    with FlopCounterMode(display=False) as counter:
        model.train()
    update_macs = counter.get_total_flops() / 2
    seconds: dict[str, list[float]] = {"env": [], "collect": [], "update": []}
    for _ in range(cycles):
        seconds["env"].append(_seconds(env_run.run) * per_step)
        seconds["collect"].append(_seconds(collect))
        seconds["update"].append(_seconds(model.train))
    med = {k: statistics.median(v) for k, v in seconds.items()}

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
    print(f"PPO (hyperparams/ppo.yml, default task), N = {num_envs}, {threads} thread(s), "
          f"median of {cycles} cycles; one rollout = {transitions} transitions")
    rows = [(f"env alone ({n_steps} batched steps)", med["env"], ""),
            ("collection (collect_rollouts)", med["collect"], f"env / collection = {med['env'] / med['collect']:.2f}"),
            (f"update (train(): {model.n_epochs} epochs, batch {batch})", med["update"],
             f"update / env = {med['update'] / med['env']:.2f}"),
            ("learn = collection + update", learn, f"env / learn = {med['env'] / learn:.2f}")]
    for label, value, ratio in rows:
        print(f"  {label:<40}{value:7.3f} s   {ratio}")
    print(f"update: {update_macs / 1e9:.2f} G multiply-adds ({update_macs / transitions / 1e6:.2f} M per transition) "
          f"at {rates['update'] / 1e9:.1f} G/s")
    print(f"torch.mm {batch} x {head.in_features} @ {head.in_features} x {head.out_features}: "
          f"{rates['mm_policy_layer'] / 1e9:.1f} G/s; 1024^3: {rates['mm_1024'] / 1e9:.1f} G/s; "
          f"the 3 x 3 convolution's forward on a mini-batch: {rates['conv3x3_forward'] / 1e9:.1f} G/s")
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            model.train()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))
    return {"transitions": transitions, "seconds": seconds, "median_seconds": med, "update_macs": update_macs,
            "macs_per_second": rates}


def adapter_parts(num_envs: int, cycles: int, actions: int = 300) -> dict:
    """ms per step through ``to_sb3`` and of the env it wraps, on the cached ``gfenv/GlyphPointer-v0``."""
    import numpy as np

    from gfenv.sb3 import to_sb3
    from gfenv.task import registered_words

    words = {**registered_words("gfenv/GlyphPointer-v0"), "action": "grid", "cache": "memory", "cache_images": 512}
    venv = to_sb3(num_envs=num_envs, seed=0, **words)
    inner = venv.venv.env  # what the adapter steps (EpisodeStatistics around the GlanceFocusVectorEnv)
    venv.reset()
    rng = np.random.default_rng(0)
    cells = venv.action_space.n
    numpy_actions = [rng.integers(cells, size=num_envs) for _ in range(actions)]
    torch_actions = [torch.as_tensor(a) for a in numpy_actions]

    def through_adapter() -> None:
        for a in numpy_actions:
            venv.step(a)

    def env_alone() -> None:
        for a in torch_actions:
            inner.step(a)

    through_adapter()  # warm-up
    env_alone()
    ms: dict[str, list[float]] = {"adapter": [], "env": []}
    for _ in range(cycles):
        ms["adapter"].append(_seconds(through_adapter) / actions * 1e3)
        ms["env"].append(_seconds(env_alone) / actions * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"SB3 adapter on the cached gfenv/GlyphPointer-v0, N = {num_envs}, median of {cycles} cycles: "
          f"{med['adapter']:.3f} ms per step through to_sb3, {med['env']:.3f} ms of the env alone: "
          f"{med['adapter'] - med['env']:.3f} ms added (env / adapter = {med['env'] / med['adapter']:.2f})")
    return {"ms_per_step": ms, "median_ms_per_step": med}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--parts", default="ppo,adapter", help="comma-separated: ppo, adapter")
    p.add_argument("--profile", action="store_true", help="torch.profiler's table of one PPO update")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    report: dict = {"num_envs": args.num_envs, "threads": args.threads}
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"ppo", "adapter"})
    if unknown:
        p.error(f"--parts {args.parts!r}: unknown {unknown}; choose among ppo, adapter.")
    from gfenv.utils import keep_freed_memory

    keep_freed_memory()
    if "ppo" in parts:
        report["ppo"] = ppo_parts(args.num_envs, args.threads, args.cycles, args.profile)
    if "adapter" in parts:
        report["adapter"] = adapter_parts(args.num_envs, args.cycles)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
