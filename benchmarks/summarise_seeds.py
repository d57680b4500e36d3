"""Mean ± std over seeds of the stage-2 runs made by benchmarks/seeds_stage2.sh (each run's own final evaluation,
``evaluations.jsonl``), with oracle-normalised scores and each run's timesteps (from its ``config.yml``).

``evaluate_agent.py --seeds 0,1,2`` re-evaluates the same runs and makes the full table (MACs, budgeted accuracy,
Markdown, plots); this script only reads what training already measured.
"""

from __future__ import annotations

import json
import pathlib
import statistics as st

import yaml

AGENTS = ("ppo", "maskable_ppo", "recurrent_ppo", "gfnet_ppo", "trpo", "a2c", "qrdqn", "sac", "ars")
SEEDS = (0, 1, 2)


def sd(values: list[float]) -> float:
    return st.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    base = json.loads(pathlib.Path("runs/seeds/baselines_1000.json").read_text())["agents"]
    r, o = base["random"]["accuracy"][-1], base["oracle"]["accuracy"][-1]
    print(f"random {r:.2f}, oracle {o:.2f} (first 1000 test images, step 5)")
    print("| agent | timesteps | seeds | step-5 accuracy (%) | oracle-normalised score (%) |\n|---|---|---|---|---|")
    for agent in AGENTS:
        runs = [pathlib.Path(f"runs/seeds/{agent}_s{s}") for s in SEEDS]
        runs = [run for run in runs if (run / "evaluations.jsonl").exists()]
        if not runs:
            continue
        accs = [json.loads((run / "evaluations.jsonl").read_text().strip().splitlines()[-1])["accuracy"][-1]
                for run in runs]
        steps = sorted({yaml.safe_load((run / "config.yml").read_text())["timesteps"] for run in runs})
        budget = "/".join(f"{s // 1000}k" for s in steps)
        sc = [100 * (a - r) / (o - r) for a in accs]
        print(f"| {agent} | {budget} | {len(accs)} | {st.mean(accs):.2f} ± {sd(accs):.2f} "
              f"| {st.mean(sc):.1f} ± {sd(sc):.1f} |")


if __name__ == "__main__":
    main()
