"""Compare agents on the test split of a gfenv task: accuracy and multiply-adds after each glimpse.

    python evaluate_agent.py --agents random,center,raster,oracle --episodes 1000 --json runs/eval/baselines.json
    python evaluate_agent.py --agents random,oracle,ppo=runs/ppo/GlanceFocus-v0_1     # a trained stage-2 run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gymnasium

from agents import AGENTS, load_agent, make_agent
from gfenv import ENV_ID
from gfenv.evaluation import evaluate, format_table
from gfenv.utils import parse_kv


def gfenv_ids() -> list[str]:
    return sorted(env_id for env_id in gymnasium.registry if env_id.startswith("gfenv/"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="random,center,oracle",
                   help=f"comma-separated agents: registered names ({', '.join(sorted(AGENTS))}) or "
                        "LABEL=RUN_DIR for a trained stage-2 run (its best_model, else model)")
    p.add_argument("--env", default=ENV_ID, help="environment id (its registered kwargs are the defaults)")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="env settings, e.g. action=grid grid=7 steps=5 dataset=glyphs checkpoint=PATH")
    p.add_argument("--episodes", type=int, default=1000, help="test images per agent (the first N, in order)")
    p.add_argument("--seed", type=int, default=0, help="seeds the env reset and the agents")
    p.add_argument("--num-envs", type=int, default=250, help="images evaluated in parallel")
    p.add_argument("--device", default="cpu", help="torch device of the env and the agents (cpu, cuda, cuda:1)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    items = list(dict.fromkeys(n.strip() for n in args.agents.split(",") if n.strip()))
    runs = dict(item.split("=", 1) for item in items if "=" in item)
    names = [n for n in items if "=" not in n]
    unknown = [n for n in names if n not in AGENTS]
    if unknown or not items:
        parser.error(f"Unknown agent(s) {', '.join(map(repr, unknown)) or '(none given)'}. "
                     f"Valid agents: {', '.join(sorted(AGENTS))}.")
    if args.env not in gfenv_ids():
        parser.error(f"Unknown env id {args.env!r}. Registered gfenv ids: {', '.join(gfenv_ids())}.")
    if args.episodes < 1 or args.num_envs < 1:
        parser.error("--episodes and --num-envs must be at least 1.")
    env_kwargs = {**gymnasium.spec(args.env).kwargs, **parse_kv(args.env_kwargs)}
    try:
        agents = {name: make_agent(name, seed=args.seed) for name in names}
        agents.update({label: load_agent(path, device=args.device) for label, path in runs.items()})
        results = evaluate(agents, env_kwargs, args.episodes, args.seed, num_envs=args.num_envs, device=args.device,
                           progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    parts = next(iter(results.values()))["macs_parts"]
    print("MACs per image of one call: " + ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.3f} M" for k, v in parts.items()
                                                      if k != "policy"))
    if args.json:
        report = {"env": args.env, "env_kwargs": env_kwargs, "episodes": args.episodes, "seed": args.seed,
                  "agents": results}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
