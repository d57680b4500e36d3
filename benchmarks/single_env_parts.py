"""Where a step of the single env (``gym.make``) goes: each part's milliseconds per env step, timed inside the loop.

    python benchmarks/single_env_parts.py [--threads 1] [--action continuous|grid] [--episodes 300]

Each part of ``GlanceFocusVectorEnv``'s step and reset (and the single env's numpy conversions) is wrapped with a
timer while the env plays ``--episodes`` episodes of random actions; a part's time is its total over the episodes
divided by the env steps (T - 1 per episode), so a reset's cost is spread over its episode's steps. Then the bare
forwards a step must do, alone in a tight loop at a batch of one: the focus encoder, the GRU step, and the
glance's encoder, first classifier step and resize (these three once per episode, spread the same way); and the
image source's time for 1 image and for the 32 a one-slot env draws ahead.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import gymnasium as gym
import torch

import gfenv  # noqa: F401  (registers the env ids)
from gfenv.glimpse import crop, glance
from gfenv.models import encode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--action", default="continuous")
    p.add_argument("--episodes", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = gym.make("gfenv/GlanceFocus-v0", action=args.action, threads=None)
    single, vec = env.unwrapped, env.unwrapped.vec
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(obj, name, label):
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0

        setattr(obj, name, wrapper)

    for name, label in (("_actions_to_corners", "actions -> corners and cells"), ("_focus", "crop + focus encoder"),
                        ("_observation", "observation"), ("_info", "info"), ("_reset_slots", "reset: image, glance, "
                        "glance encoder, first step"), ("step", "vector env step (all of it)"),
                        ("reset", "vector env reset (all of it)")):
        timed(vec, name, label)
    timed(vec.model.classifier, "step", "GRU step + head")
    timed(single, "_np", "numpy copies of the observation")
    timed(single, "_info", "info as numbers")
    reward_fn = vec.reward_fn

    class Timed:
        def __call__(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return reward_fn(*a, **k)
            finally:
                spent["reward"] += time.perf_counter() - t0

        def __getattr__(self, name):
            return getattr(reward_fn, name)

    vec.reward_fn = Timed()
    env.reset(seed=0)
    env.action_space.seed(0)

    def play(n: int) -> None:
        for _ in range(n):
            env.reset()
            for _ in range(vec.steps - 1):
                env.step(env.action_space.sample())

    play(20)
    spent.clear()
    t0 = time.perf_counter()
    play(args.episodes)
    steps = args.episodes * (vec.steps - 1)
    total = (time.perf_counter() - t0) / steps * 1e3
    print(f"{torch.get_num_threads()} thread(s), action={args.action}, {args.episodes} episodes: "
          f"{total:.3f} ms per env step ({1e3 / total:,.0f} steps/s), of which (ms per env step):")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<48}{seconds / steps * 1e3:7.3f}")

    model, p_size = vec.model, vec.patch_size
    patch = crop(vec.images, vec.corners[:1], p_size)
    feats, _ = encode(model.focus_encoder, patch)

    def alone(fn, n: int = 300) -> float:
        for _ in range(20):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    with torch.no_grad():
        focus = alone(lambda: encode(model.focus_encoder, patch))
        gru = alone(lambda: model.classifier.step(feats, vec.memory, 1))
        g = glance(vec.images, p_size, model.config.glance_mode)
        per_episode = (alone(lambda: glance(vec.images, p_size, model.config.glance_mode))
                       + alone(lambda: encode(model.glance_encoder, g)) + alone(lambda: model.classifier.first(feats)))
        one, ahead = torch.arange(1), torch.arange(32)
        image_1, image_32 = alone(lambda: vec.source.get(one)), alone(lambda: vec.source.get(ahead))
    floor = focus + gru + per_episode / (vec.steps - 1)
    print(f"bare forwards alone at a batch of one (ms): focus encoder {focus:.3f}, GRU step {gru:.3f}, glance + "
          f"glance encoder + first step {per_episode:.3f} per episode; floor {floor:.3f} ms per env step "
          f"({floor / total:.0%} of the step)")
    print(f"the source's images (ms): 1 image {image_1:.3f}, 32 images {image_32:.3f} (what a one-slot env draws "
          f"ahead: {image_32 / 32:.3f} per reset)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
