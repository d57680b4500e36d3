"""Mean ± std over seeds of the stage-2 runs made by benchmarks/seeds_stage2.sh, with oracle-normalised scores."""

from __future__ import annotations

import json
import pathlib
import statistics as st

RUNS = (("ppo", "60k"), ("maskable_ppo", "60k"), ("recurrent_ppo", "30k"), ("gfnet_ppo", "30k"))


def sd(values: list[float]) -> float:
    return st.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    base = json.loads(pathlib.Path("runs/seeds/baselines_1000.json").read_text())["agents"]
    r, o = base["random"]["accuracy"][-1], base["oracle"]["accuracy"][-1]
    print(f"random {r:.2f}, oracle {o:.2f} (first 1000 test images, step 5)")
    print("| agent | timesteps | seeds | step-5 accuracy (%) | oracle-normalised score (%) |\n|---|---|---|---|---|")
    for agent, budget in RUNS:
        files = [pathlib.Path(f"runs/seeds/{agent}_s{s}/evaluations.jsonl") for s in range(3)]
        accs = [json.loads(f.read_text().strip().splitlines()[-1])["accuracy"][-1] for f in files if f.exists()]
        if accs:
            sc = [100 * (a - r) / (o - r) for a in accs]
            print(f"| {agent} | {budget} | {len(accs)} | {st.mean(accs):.2f} ± {sd(accs):.2f} "
                  f"| {st.mean(sc):.1f} ± {sd(sc):.1f} |")


if __name__ == "__main__":
    main()
