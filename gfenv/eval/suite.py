"""The benchmark suite: the same agents on every embedded task, each task's oracle-normalised score, and a suite score
per agent (the mean of its normalised scores over the tasks, Procgen's way of summarising a suite).

Embedded tasks are the registered ones whose stage-1 encoders ship inside the package (``Task.checkpoint``): they
need no data folder and no training before the benchmark. Results come from ``gfenv.eval.evaluation.benchmark``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gfenv.eval.leaderboard import markdown_table
from gfenv.task import TASKS, resolve_task, task_words

SUITE_LEGEND = ("suite score: the agent's oracle-normalised score at the last step, 100 (agent - random) / (oracle - "
                "random), averaged over the tasks it ran on, for each seed; mean ± sample std over seeds. Tasks an "
                "agent could not run on are listed, not counted.")


def embedded_tasks() -> list[str]:
    """The registered tasks whose stage-1 encoders ship with gfenv, in registration order."""
    return [env_id for env_id, task in TASKS.items() if task.checkpoint]


def check_suite_tasks(env_ids: list[str], registered: list[str]) -> None:
    """ValueError (unknown id) or FileNotFoundError (no shipped encoders and no data or checkpoint) naming the task
    and what is missing, before anything runs."""
    for env_id in env_ids:
        if env_id not in registered:
            raise ValueError(f"Unknown task {env_id!r} for the suite. Registered gfenv ids: {', '.join(registered)}.")
        task = TASKS.get(env_id)
        if task is None or task.checkpoint:
            continue
        try:
            resolve_task(task_words(task.words))
        except FileNotFoundError as err:
            first = str(err).splitlines()[0].rstrip(":;.")
            raise FileNotFoundError(f"Task {env_id} cannot join the suite: no stage-1 encoders ship for it "
                                    f"({first}); pick embedded tasks ({', '.join(embedded_tasks())}) or pass "
                                    "its data_root and checkpoint with --env-kwargs and --envs " + env_id
                                    + ".") from None


def suite_scores(reports: dict[str, dict[str, Any]], skipped: dict[str, list[str]] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Per agent label: ``score`` and ``score_std`` (mean and sample std over seeds of the per-seed mean, over the
    tasks it ran on, of the last step's oracle-normalised score), ``per_seed``, ``tasks`` (each task's mean score)
    and ``missing`` (tasks it did not run on, from ``skipped``: label -> reasons)."""
    labels = list(dict.fromkeys(label for report in reports.values() for label in report["agents"]))
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        per_task: dict[str, dict[str, float]] = {}
        for env_id, report in reports.items():
            result = report["agents"].get(label)
            if not result or "score" not in result:
                continue
            per_task[env_id] = {seed: run["score"][-1] for seed, run in result["per_seed"].items() if "score" in run}
        if not per_task:
            continue
        seeds = sorted(set.intersection(*(set(s) for s in per_task.values())), key=int)
        per_seed = {s: float(np.mean([scores[s] for scores in per_task.values()])) for s in seeds}
        values = np.array(list(per_seed.values()), dtype=np.float64)
        out[label] = {"score": float(values.mean()) if len(values) else math.nan,
                      "score_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                      "per_seed": per_seed, "seeds": [int(s) for s in seeds],
                      "tasks": {env_id: float(np.mean(list(v.values()))) for env_id, v in per_task.items()},
                      "missing": sorted(set(reports) - set(per_task))}
    return out


def format_suite(scores: dict[str, dict[str, Any]], env_ids: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the suite table: each task's score, then the suite score (mean ± std over seeds)."""
    names = [env_id.rsplit("/", 1)[-1] for env_id in env_ids]
    header = ["agent", *names, "suite score"]
    rows = []
    for label, s in sorted(scores.items(), key=lambda item: -item[1]["score"]):
        cells = [f"{s['tasks'][e]:.1f}" if e in s["tasks"] else "-" for e in env_ids]
        rows.append([label, *cells, f"{s['score']:.1f} ± {s['score_std']:.1f}"])
    return header, rows


def suite_text(scores: dict[str, dict[str, Any]], env_ids: list[str]) -> str:
    header, rows = format_suite(scores, env_ids)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join([r[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(r[1:], widths[1:]))]) for r in
             [header, *rows]]
    return "\n".join(["oracle-normalised score at step T (%) per task, and the suite score", lines[0],
                      "-" * len(lines[0]), *lines[1:]])


def suite_markdown(scores: dict[str, dict[str, Any]], env_ids: list[str]) -> str:
    header, rows = format_suite(scores, env_ids)
    return "\n".join(["## Suite score", "", markdown_table(header, rows, set(header[1:])), "", SUITE_LEGEND])
