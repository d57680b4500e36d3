"""Paired differences at step T between two agents of one ``evaluate_agent.py --seeds ... --json`` report: per seed
(the same images, the same seed), then mean ± std over seeds.

    python benchmarks/paired.py runs/suite/pointer_seeds.json maskable_ppo_stage3 maskable_ppo
    python benchmarks/paired.py runs/suite/suite.json maskable_ppo open_loop --env gfenv/GlyphChain-v0   # --suite
"""

from __future__ import annotations

import argparse
import json
import statistics as st


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="the --json file of evaluate_agent.py")
    p.add_argument("a", help="agent label")
    p.add_argument("b", help="agent label it is compared with (a - b)")
    p.add_argument("--env", help="the task, in a report of evaluate_agent.py --suite")
    args = p.parse_args()
    report = json.loads(open(args.report).read())
    if "envs" in report:  # a --suite report: one report per task
        if args.env not in report["envs"]:
            raise SystemExit(f"--env {args.env!r}: name one of the report's tasks: {', '.join(report['envs'])}")
        report = report["envs"][args.env]
    agents = report.get("agents", report)
    for label in (args.a, args.b):
        if label not in agents:
            raise SystemExit(f"{label!r} is not in {args.report}; its agents: {', '.join(agents)}")
    a, b = agents[args.a], agents[args.b]
    seeds = sorted(set(a.get("per_seed", {})) & set(b.get("per_seed", {})), key=int)
    if not seeds:
        raise SystemExit(f"{args.report} holds no per-seed results: evaluate with --seeds S1,S2,...")
    diffs = [a["per_seed"][s]["accuracy"][-1] - b["per_seed"][s]["accuracy"][-1] for s in seeds]
    for s, d in zip(seeds, diffs, strict=True):
        print(f"seed {s}: {args.a} {a['per_seed'][s]['accuracy'][-1]:.2f} - {args.b} "
              f"{b['per_seed'][s]['accuracy'][-1]:.2f} = {d:+.2f}")
    sd = st.stdev(diffs) if len(diffs) > 1 else 0.0
    print(f"step T, {args.a} - {args.b}: {st.mean(diffs):+.2f} ± {sd:.2f} points over {len(diffs)} seeds")


if __name__ == "__main__":
    main()
