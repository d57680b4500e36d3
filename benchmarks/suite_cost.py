"""What training the suite's reference table cost: seconds per run from ``OUT/times.tsv`` (written by
``benchmarks/suite.sh``), summed per task and agent, with the total in core-hours and in hours on two cores.

    python benchmarks/suite_cost.py runs/suite_table

A run folder without a line in times.tsv (trained by a version of suite.sh that did not write one) counts the span
between its first and last file, and is marked ``*``: it misses the seconds before the run's first file.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def folder_seconds(run: Path) -> float:
    stamps = [p.stat().st_mtime for p in run.rglob("*") if p.is_file()]
    return max(stamps) - min(stamps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the suite's OUT folder (runs/suite by default in suite.sh)")
    p.add_argument("--cores", type=int, default=2, help="runs at a time, for the wall-time figure (default 2)")
    args = p.parse_args()
    measured = {}
    if (args.out / "times.tsv").exists():
        with open(args.out / "times.tsv") as f:
            for task, agent, seed, seconds in csv.reader(f, delimiter="\t"):
                measured[(task, agent, seed)] = float(seconds)  # the last line of a run that was trained again
    runs = {}
    for run in sorted(args.out.glob("*/*_s*")):
        if run.is_dir() and ((run / "model.zip").exists() or (run / "model.pt").exists()):
            agent, seed = run.name.rsplit("_s", 1)
            key = (run.parent.name, agent, seed)
            runs[key] = (measured[key], "") if key in measured else (folder_seconds(run), "*")
    per = defaultdict(lambda: [0.0, 0, ""])
    for (task, agent, _), (seconds, mark) in runs.items():
        row = per[(task, agent)]
        row[0] += seconds
        row[1] += 1
        row[2] = row[2] or mark
    print(f"{'task':<18}{'agent':<15}{'runs':>5}{'seconds':>10}")
    for (task, agent), (seconds, n, mark) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"{task:<18}{agent:<15}{n:>5}{seconds:>10.0f}{mark}")
    total = sum(s for s, _ in runs.values())
    print(f"{len(runs)} runs, {total:,.0f} s: {total / 3600:.2f} core-hours, "
          f"{total / 3600 / args.cores:.2f} h on {args.cores} cores (one run per core)")
    if any(m for _, m in runs.values()):
        print("* some runs timed by their folders' file times (no line in times.tsv)")


if __name__ == "__main__":
    main()
