"""Where a policy's step-T errors come from: does it revisit cells, and was a good cell there to take?

    python benchmarks/stage3_diagnosis.py RUN_DIR [--checkpoint PATH] [--episodes 2000]

Runs the trained agent of RUN_DIR deterministically on the first test images (the env's ``checkpoint`` replaced by
``--checkpoint``, e.g. the run's stage-3 model) and prints: accuracy after each step; how many distinct cells the
episodes visit and how often a step repeats the previous cell; the errors at step T, how many of them visit one cell
only, were right at step 2, and could have been fixed by another first cell (one whose patch gives the true class a
probability above 0.5, from the env's ``cell_confidences``, the oracle's view) against the cell the policy took.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from gymnasium.vector.vector_env import AutoresetMode

from gfenv.env import GlanceFocusVectorEnv
from gfenv.train.runs import load_agent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None, help="the env's model (default: the run's own)")
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--batch", type=int, default=250)
    args = p.parse_args(argv)
    agent = load_agent(args.run_dir)
    kwargs = {**agent.env_kwargs, **({"checkpoint": args.checkpoint} if args.checkpoint else {})}
    if kwargs.get("action", "grid") != "grid":
        p.error("the diagnosis is for grid actions (it compares the cells taken with every cell)")
    env = GlanceFocusVectorEnv(num_envs=args.batch, split="test", sampling="sequential", seed=0,
                               autoreset_mode=AutoresetMode.DISABLED, **kwargs)
    cells, correct, first_conf = [], [], []
    with torch.no_grad():
        for start in range(0, args.episodes, args.batch):
            obs, info = env.reset(seed=0) if start == 0 else env.reset()
            agent.reset(env)
            taken, right = [], [info["correct"].clone()]
            for t in range(env.steps - 1):
                if t == 0:
                    first_conf.append(env.cell_confidences())  # (N, G*G) true-class probability after each cell
                action = torch.as_tensor(agent.act(obs, env)).long()
                obs, _, _, _, info = env.step(action)
                taken.append(action)
                right.append(info["correct"].clone())
            cells.append(torch.stack(taken, 1))
            correct.append(torch.stack(right, 1))
    n = args.episodes
    cells, correct, first_conf = torch.cat(cells)[:n], torch.cat(correct)[:n], torch.cat(first_conf)[:n]
    distinct = torch.tensor([len(set(row.tolist())) for row in cells])
    err = ~correct[:, -1]
    good_first = first_conf > 0.5
    taken_first = first_conf.gather(1, cells[:, :1]).squeeze(1) > 0.5
    print(f"{n} test images, agent {agent.name} of {args.run_dir}, model {kwargs.get('checkpoint', 'shipped')}")
    print("accuracy (%) after each step: " + " ".join(f"{v:.2f}" for v in correct.float().mean(0) * 100))
    print(f"episodes by distinct cells visited: {dict(sorted(collections.Counter(distinct.tolist()).items()))}")
    repeats = (cells[:, 1:] == cells[:, :-1]).float().mean(0)
    print("share of steps 3..T that repeat the previous cell: " + " ".join(f"{v:.3f}" for v in repeats))
    print(f"errors at step T: {int(err.sum())}; of them one cell only: {int((distinct[err] == 1).sum())}, right at "
          f"step 2: {int(correct[err][:, 1].sum())}, with some first cell giving p(true) > 0.5: "
          f"{int(good_first[err].any(1).sum())}, whose first cell taken gave p(true) > 0.5: "
          f"{int(taken_first[err].sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
