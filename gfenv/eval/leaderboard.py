"""Leaderboard tables of a benchmark: rl-baselines3-zoo's benchmark table (algo, env_id, mean, std, ...) extended
with seeds, the oracle-normalised score and multiply-adds, plus per-step and budgeted tables (Markdown and text).

Inputs are ``gfenv.eval.evaluation.benchmark`` results (per agent label, mean and std over seeds).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

STATIC_LABEL = "static (full image)"
LEADERBOARD_COLUMNS = ("algo", "env_id", "mean", "std", "seeds", "score", "score_std", "MACs (M)", "n_timesteps",
                       "eval_episodes")
RIGHT = {"mean", "std", "seeds", "score", "score_std", "MACs (M)", "eval_episodes"}
LEGEND = ("mean, std: top-1 test accuracy (%) after the last step T, mean and sample std over seeds; score: "
          "oracle-normalised accuracy at step T, 100 (agent - random) / (oracle - random), mean and std over seeds "
          "(random and oracle evaluated on the same images with the same seed); MACs (M): multiply-adds per image "
          "after T steps (glance and focus encoders, classifier and the agent's policy network); n_timesteps: "
          "stage-2 training timesteps; eval_episodes: test images per seed.")


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def leaderboard_rows(env_id: str, results: dict[str, dict], static: dict | None = None) -> list[dict[str, str]]:
    """One row per agent (and one for the static model): the last step's accuracy, score and MACs."""
    rows = []
    for label, r in results.items():
        score, score_std = r.get("score"), r.get("score_std")
        rows.append({"algo": label, "env_id": env_id, "mean": _num(r["accuracy"][-1], ".2f"),
                     "std": _num(r["accuracy_std"][-1], ".2f") if "accuracy_std" in r else "-",
                     "seeds": str(len(r.get("seeds", [0]))),
                     "score": _num(score[-1], ".1f") if score else "-",
                     "score_std": _num(score_std[-1], ".1f") if score_std else "-",
                     "MACs (M)": _num(r["macs"][-1] / 1e6, ".2f"),
                     "n_timesteps": _timesteps(r.get("n_timesteps")), "eval_episodes": str(r.get("episodes", "-"))})
    if static:
        score = static_score(static, results)
        rows.append({"algo": STATIC_LABEL, "env_id": env_id, "mean": _num(static["accuracy"], ".2f"), "std": "-",
                     "seeds": "-", "score": _num(score, ".1f"), "score_std": "-",
                     "MACs (M)": _num(static["macs"] / 1e6, ".2f"), "n_timesteps": "-",
                     "eval_episodes": str(static.get("episodes", "-"))})
    return rows


def _timesteps(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1000:g}k" if n < 1_000_000 else f"{n / 1e6:g}M"


def static_score(static: dict, results: dict[str, dict]) -> float | None:
    """The static model's accuracy on the oracle-normalised scale of the last step (None without random/oracle)."""
    if "random" not in results or "oracle" not in results:
        return None
    r, o = results["random"]["accuracy"][-1], results["oracle"]["accuracy"][-1]
    return 100.0 * (static["accuracy"] - r) / (o - r) if o != r else None


def markdown_table(header: list[str], rows: list[list[str]], right: set[str] | None = None) -> str:
    """A padded Markdown table; columns named in ``right`` are right-aligned."""
    right = right or set()
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "|" + "|".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, header)) + "|"

    rule = "|" + "|".join("-" * (w - 1) + ":" if h in right else "-" * w for w, h in zip(widths, header)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def markdown_leaderboard(rows: list[dict[str, str]]) -> str:
    """rl-baselines3-zoo's benchmark table (one row per agent and env) with seeds, score and MACs columns."""
    return markdown_table(list(LEADERBOARD_COLUMNS), [[row[c] for c in LEADERBOARD_COLUMNS] for row in rows], RIGHT)


def _with_std(mean: float | None, std: float | None, fmt: str, several: bool) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    if several and std is not None and math.isfinite(std):
        return f"{format(mean, fmt)} ± {format(std, fmt)}"
    return format(mean, fmt)


def anytime_markdown(results: dict[str, dict]) -> str:
    """Per-step tables: accuracy (%), MACs (M) and score (%) after each step t = 1..T (mean ± std over seeds)."""
    steps = max(len(r["accuracy"]) for r in results.values())
    several = any(len(r.get("seeds", ())) > 1 for r in results.values())
    header = ["agent", *(f"t={t}" for t in range(1, steps + 1))]
    right = set(header[1:])
    parts = []
    for key, fmt, scale, name in (("accuracy", ".2f", 1.0, "Accuracy (%)"), ("macs", ".2f", 1e-6, "MACs (M)"),
                                  ("score", ".1f", 1.0, "Oracle-normalised score (%)")):
        rows = []
        for label, r in results.items():
            if key not in r:
                continue
            std = r.get(f"{key}_std") or [None] * len(r[key])
            rows.append([label, *(_with_std(None if m is None else m * scale, None if s is None else s * scale, fmt,
                                            several) for m, s in zip(r[key], std))])
        if rows:
            parts.append(f"{name} after step t (t=1: the glance alone):\n\n" + markdown_table(header, rows, right))
    return "\n\n".join(parts)


def budget_levels(results: dict[str, dict]) -> list[float]:
    """MAC budgets at which to compare budgeted curves: the encoders' and classifier's cost of 1..T-1 focus patches
    after the glance (no policy), from the first agent's ``macs_parts``."""
    r = next(iter(results.values()))
    parts = r["macs_parts"]
    glance = parts["glance_encoder"] + parts["classifier"]
    focus = parts["focus_encoder"] + parts["classifier"]
    return [glance + k * focus for k in range(1, r["steps"])]


def accuracy_at_budget(curve: list[dict], budget: float) -> float | None:
    """The budgeted curve's accuracy at ``budget`` MACs, linearly interpolated; None outside the curve's range."""
    pts = sorted((p["macs"], p["accuracy"]) for p in curve)
    macs = np.array([m for m, _ in pts])
    if not len(pts) or budget < macs[0] - 1e-6 or budget > macs[-1] + 1e-6:
        return None
    return float(np.interp(budget, macs, [a for _, a in pts]))


def budgeted_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each agent's budgeted accuracy at the ``budget_levels`` that some curve reaches, then its
    lowest and highest (MACs, accuracy) points."""
    curves = {label: r["budgeted"] for label, r in results.items() if r.get("budgeted")}
    levels = [b for b in budget_levels(results)
              if any(accuracy_at_budget(curve, b) is not None for curve in curves.values())]
    header = ["agent", *(f"{b / 1e6:.2f} M" for b in levels), "cheapest (M, %)", "dearest (M, %)"]
    rows = []
    for label, curve in curves.items():
        lo, hi = min(curve, key=lambda p: p["macs"]), max(curve, key=lambda p: p["macs"])
        rows.append([label, *(_num(accuracy_at_budget(curve, b), ".2f") for b in levels),
                     f"{lo['macs'] / 1e6:.2f}, {lo['accuracy']:.2f}", f"{hi['macs'] / 1e6:.2f}, {hi['accuracy']:.2f}"])
    return header, rows


def format_budgeted(results: dict[str, dict]) -> str:
    """Text table of ``budgeted_rows`` (empty string when no agent has a budgeted curve)."""
    header, rows = budgeted_rows(results)
    if not rows:
        return ""
    table = [header, *rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]) for row in table]
    title = ("Budgeted batch classification: accuracy (%) at an average budget of (MACs per image), interpolated "
             "on the 39-point curve")
    return "\n".join([title, lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown_report(env_id: str, report: dict[str, Any], command: str | None = None) -> str:
    """The Markdown leaderboard of one env: the zoo-style table, the per-step tables and the budgeted table."""
    results, static = report["agents"], report.get("static")
    seeds = report.get("seeds", [report.get("seed")])
    lines = [f"## {env_id}", "",
             f"{report['episodes']} test images, seeds {', '.join(map(str, seeds))}"
             + (f"; budgeted thresholds fitted on {report['threshold_episodes']} train images"
                if report.get("threshold_episodes") else "") + ".", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [markdown_leaderboard(leaderboard_rows(env_id, results, static)), "", LEGEND, "",
              anytime_markdown(results)]
    header, rows = budgeted_rows(results)
    if rows:
        lines += ["", "Budgeted batch classification (MSDNet/GFNet protocol): accuracy (%) at an average budget of "
                      "multiply-adds per image, interpolated on each agent's 39-point curve (p = 0.05..1.95); '-': "
                      "outside the curve.", "", markdown_table(header, rows, set(header[1:]))]
    if static:
        lines += ["", f"Static reference ({STATIC_LABEL}, `{static.get('checkpoint', '?')}`): "
                      f"{static['accuracy']:.2f} % at {static['macs'] / 1e6:.2f} M MACs per image."]
    return "\n".join(lines) + "\n"
