"""Two versions of gfenv side by side: the single env's speed and ``import gfenv``'s time against ``import torch``.

    git worktree add /tmp/gfenv_before <commit>        # or: git archive <commit> | tar -x -C /tmp/gfenv_before
    python benchmarks/versions.py --before /tmp/gfenv_before [--after .] [--rounds 12] [--json runs/versions.json]

Each version runs in its own worker process (its tree first on ``sys.path``), so both stay warm; the coordinator
asks them in turn, in reverse order every other round, to play ``--episodes`` episodes of ``gym.make`` (the default
task, random actions, torch's thread count unless ``--threads``) and reports each version's median steps/s and the
median of the per-round ratios after / before. Import times: fresh interpreters run ``import torch``, then
``import gfenv`` of each version, in turn (``--imports`` rounds); a figure is the median, and ``gfenv / torch`` the
median of the ratios of the runs taken side by side in one round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
if int(sys.argv[3]) > 0:
    torch.set_num_threads(int(sys.argv[3]))
import gymnasium as gym, gfenv
env = gym.make("gfenv/GlanceFocus-v0", action=sys.argv[2])
env.reset(seed=0)
env.action_space.seed(0)
def play(n):
    steps = 0
    for _ in range(n):
        env.reset()
        done = False
        while not done:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            done = term or trunc
            steps += 1
    return steps
play(5)
print(json.dumps({"file": gfenv.__file__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    steps = play(int(line))
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0)}), flush=True)
"""


def import_seconds(tree: Path, module: str) -> float:
    """Wall time of a fresh interpreter that imports ``module`` (from ``tree``) and exits."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); import {module}"],
                   check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the tree of the earlier version")
    p.add_argument("--after", default=".", help="the tree of the later version (default: this one)")
    p.add_argument("--rounds", type=int, default=12, help="timed runs of each version's single env")
    p.add_argument("--episodes", type=int, default=50, help="episodes per timed run")
    p.add_argument("--action", default="continuous", help="the single env's action mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--imports", type=int, default=6, help="rounds of import timings (0: none)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    workers = {name: subprocess.Popen([sys.executable, "-c", WORKER, str(tree), args.action, str(args.threads)],
                                      cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(tree)})
               for name, tree in trees.items()}
    report: dict = {"machine": os.uname().machine, "cpus": os.cpu_count(), "episodes": args.episodes,
                    "action": args.action}
    for name, w in workers.items():
        report[f"{name}_worker"] = json.loads(w.stdout.readline())
    rates: dict[str, list[float]] = {name: [] for name in workers}
    for r in range(args.rounds):
        for name in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
            workers[name].stdin.write(f"{args.episodes}\n")
            workers[name].stdin.flush()
            rates[name].append(json.loads(workers[name].stdout.readline())["steps_per_s"])
    for w in workers.values():
        w.stdin.close()
        w.wait()
    ratios = [a / b for a, b in zip(rates["after"], rates["before"])]
    report["single_env"] = {"steps_per_s": rates, "after_over_before": ratios,
                            "median_steps_per_s": {k: statistics.median(v) for k, v in rates.items()},
                            "median_after_over_before": statistics.median(ratios)}
    print(f"single env (gym.make, action={args.action}, {args.episodes} episodes a run, {args.rounds} rounds):")
    for name, v in rates.items():
        print(f"  {name:<7} {statistics.median(v):8.0f} steps/s   ({trees[name]})")
    print(f"  after / before: {statistics.median(ratios):.2f} (median of the rounds' ratios; "
          f"range {min(ratios):.2f}-{max(ratios):.2f})")
    if args.imports:
        times: dict[str, list[float]] = {"torch": [], "gfenv before": [], "gfenv after": []}
        for r in range(args.imports):
            order = [("torch", trees["after"], "torch"), ("gfenv before", trees["before"], "gfenv"),
                     ("gfenv after", trees["after"], "gfenv")]
            for label, tree, module in (order if r % 2 == 0 else order[::-1]):
                times[label].append(import_seconds(tree, module))
        report["imports"] = {"seconds": times, **{
            f"{v}_over_torch": statistics.median([g / t for g, t in zip(times[f"gfenv {v}"], times["torch"])])
            for v in ("before", "after")}}
        print(f"imports ({args.imports} rounds, fresh interpreters, median seconds):")
        for label, v in times.items():
            print(f"  import {label:<13} {statistics.median(v):6.2f} s")
        for v in ("before", "after"):
            print(f"  gfenv {v} / torch: {report['imports'][f'{v}_over_torch']:.2f} (median of the rounds' ratios)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
