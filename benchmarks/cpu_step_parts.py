"""Where a CPU step of the batched env goes, and what the two CPU speed-ups buy, measured in one process.

    python benchmarks/cpu_step_parts.py [--threads 1] [--cycles 5]

Prints, for N = 256 slots of the default task:
- the focus encoder on 256 patches, plain and folded (``gfenv.models.encode``), alternated cycle by cycle (ms per
  call, the median of 10 calls per cycle);
- the GRU classifier step on 256 slots (ms per call) and its multiply-adds (``torch.utils.flop_counter``), and the
  glance's step from the zero state (``classifier.first``, what a reset takes);
- what the env adds around them: 256 new glyph images (a reset), their glance (and the same by ``F.avg_pool2d``,
  the kernel the area glance used before), 256 crops (a step);
- minor page faults per batched env step, with and without ``gfenv.utils.keep_freed_memory`` (each in a fresh
  process, since the allocator setting cannot be undone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _median_ms(fn, calls: int = 10) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _env(n: int = 256):
    from gymnasium.vector.vector_env import AutoresetMode

    from gfenv.env import GlanceFocusVectorEnv

    return GlanceFocusVectorEnv(num_envs=n, action="grid", seed=0, autoreset_mode=AutoresetMode.SAME_STEP)


def page_faults_per_step(steps: int = 32) -> float:
    env = _env()
    gen = torch.Generator().manual_seed(0)
    actions = [torch.randint(49, (env.num_envs,), generator=gen) for _ in range(steps)]
    env.reset(seed=0)
    for a in actions:  # warm
        env.step(a)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for a in actions:
        env.step(a)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--faults-only", action="store_true", help=argparse.SUPPRESS)  # the child processes
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from gfenv.utils import keep_freed_memory

    if args.faults_only:
        kept = keep_freed_memory()
        print(json.dumps({"kept": kept, "faults": page_faults_per_step()}))
        return 0
    import torch.nn.functional as F

    from gfenv.flops import count_macs
    from gfenv.glimpse import crop, glance
    from gfenv.models import encode

    keep_freed_memory()
    env = _env()
    m = env.model
    images, _ = env.source.get(torch.arange(env.num_envs))
    cells = torch.randint(49, (env.num_envs,), generator=torch.Generator().manual_seed(1))
    x = crop(images, env.corners[cells], env.patch_size)
    feats, _ = m.focus_encoder(x)
    memory = m.classifier.init_state(env.num_envs)
    plain, folded = [], []
    with torch.no_grad():
        m.focus_encoder(x), encode(m.focus_encoder, x)  # warm both
        for _ in range(args.cycles):
            plain.append(_median_ms(lambda: m.focus_encoder(x)))
            folded.append(_median_ms(lambda: encode(m.focus_encoder, x)))
        gru = [_median_ms(lambda: m.classifier.step(feats, memory, 1)) for _ in range(args.cycles)]
        first = [_median_ms(lambda: m.classifier.first(feats)) for _ in range(args.cycles)]
        # what the env adds per reset (256 new images) and per step, beside the encoders
        source, idx = env.source, torch.randint(len(env.source), (env.num_envs,), generator=torch.Generator())
        mode = m.config.glance_mode
        images_ms = [_median_ms(lambda: source.get(idx)) for _ in range(args.cycles)]
        glance_ms = [_median_ms(lambda: glance(images, env.patch_size, mode)) for _ in range(args.cycles)]
        block = images.shape[-1] // env.patch_size  # the previous glance: F.avg_pool2d over whole blocks
        pool_ms = [_median_ms(lambda: F.avg_pool2d(images, block)) for _ in range(args.cycles)]
        crop_ms = [_median_ms(lambda: crop(images, env.corners[cells], env.patch_size)) for _ in range(args.cycles)]
    macs = count_macs(lambda f, h: m.classifier.step(f, h, 1), feats, memory)
    print(f"{torch.get_num_threads()} torch thread(s), N = {env.num_envs}, {args.cycles} cycles")
    print("focus encoder, plain  (ms per call): " + " ".join(f"{v:.1f}" for v in plain))
    print("focus encoder, folded (ms per call): " + " ".join(f"{v:.1f}" for v in folded))
    print("GRU classifier step   (ms per call): " + " ".join(f"{v:.2f}" for v in gru)
          + f"   ({macs / 1e6:.1f} M multiply-adds for {env.num_envs} slots)")
    print("GRU glance step, first (ms per call): " + " ".join(f"{v:.2f}" for v in first))
    print(f"glyph images, {env.num_envs} per call (ms): " + " ".join(f"{v:.2f}" for v in images_ms))
    print(f"glance ({mode}, matrix products) (ms): " + " ".join(f"{v:.2f}" for v in glance_ms))
    print("glance by F.avg_pool2d (ms):          " + " ".join(f"{v:.2f}" for v in pool_ms))
    print(f"crops, {env.num_envs} per call (ms):       " + " ".join(f"{v:.2f}" for v in crop_ms))
    for setting in ("1", "0"):
        child = subprocess.run([sys.executable, __file__, "--faults-only", "--threads", str(args.threads)],
                               env={**os.environ, "GFENV_KEEP_FREED_MEMORY": setting}, capture_output=True,
                               text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        label = "keep_freed_memory on " if r["kept"] else "keep_freed_memory off"
        print(f"minor page faults per batched step, {label}: {r['faults']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
