"""Benchmark agents on a task's test split: accuracy and multiply-adds after each glimpse, on the same images.

``evaluate`` runs agents once (one seed, one split); ``benchmark`` runs them over seeds, adds the budgeted batch
classification curve (``gfenv.eval.budgeted``, thresholds fitted on the train split) and the mean and std over seeds.
Agents are duck-typed (``AgentLike``), so gfenv needs nothing from the ``agents`` package.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.vector.vector_env import AutoresetMode
from tqdm.auto import tqdm

from gfenv.cache import cover_episodes
from gfenv.env import GlanceFocusVectorEnv
from gfenv.eval.budgeted import budgeted_curve
from gfenv.rollout import FIXED_ENV_KWARGS, AgentLike, agent_env_kwargs, check_action_mode, play_batch

DEFAULT_ACTION = inspect.signature(GlanceFocusVectorEnv).parameters["action"].default
PER_STEP_KEYS = ("accuracy", "macs", "confidence", "true_class_confidence", "glimpses")
SPREAD_KEYS = ("accuracy", "macs", "score")


def evaluate(agents: dict[str, AgentLike], env_kwargs: dict[str, Any], episodes: int, seed: int,
             num_envs: int = 250, device: str | torch.device = "cpu", progress: bool = True, split: str = "test",
             record: bool = False, bar: tqdm | None = None) -> dict[str, dict]:
    """Run every agent on the first ``episodes`` images of ``split`` (in order, so all agents see the same ones).

    Returns, per agent label, lists over glimpses t = 1..T (t = 1 is the glance alone):
    ``accuracy`` (percent correct), ``macs`` (mean cumulative multiply-adds per image: the env's encoders and
    classifier plus the agent's ``macs_per_step`` per decision made), ``confidence`` (mean max softmax
    probability), ``true_class_confidence`` (mean softmax probability of the true class) and ``glimpses`` (mean
    glimpses taken, below t only for agents that stop early); plus ``episodes``, ``steps`` (T), ``action`` (the
    env's action mode), ``split``, ``env_kwargs`` (the agent's env settings), ``policy_macs_per_step`` and
    ``macs_parts`` (multiply-adds per image of one call of each part: glance encoder, focus encoder, classifier
    step, policy).
    With ``record``, also ``per_image``: (episodes, T) tensors ``confidence``, ``correct`` and ``macs``.
    ``bar``: a shared progress bar to advance (instead of one bar per agent).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}.")
    plans = {label: agent_env_kwargs(agent, env_kwargs) for label, agent in agents.items()}
    for label, agent in agents.items():
        fixed = sorted(set(FIXED_ENV_KWARGS) & set(plans[label]))
        if fixed:
            raise ValueError(f"evaluate sets {', '.join(fixed)} itself (the split given, sequential images); "
                             f"drop them from the env kwargs.")
        check_action_mode(agent, plans[label].get("action", DEFAULT_ACTION), label)
    envs: dict[str, GlanceFocusVectorEnv] = {}
    results = {}
    for label, agent in agents.items():
        key = repr(sorted(plans[label].items()))
        if key not in envs:
            envs[key] = GlanceFocusVectorEnv(num_envs=min(num_envs, episodes), split=split, sampling="sequential",
                                             device=device, autoreset_mode=AutoresetMode.DISABLED,
                                             **cover_episodes(plans[label], episodes))
        if bar is not None:
            bar.set_description(f"{label} ({split})")
            results[label] = run_episodes(agent, envs[key], episodes, seed, bar.update, record=record)
        else:
            with tqdm(total=episodes, desc=label, unit="img", disable=not progress) as own:
                results[label] = run_episodes(agent, envs[key], episodes, seed, own.update, record=record)
        results[label].update(split=split, env_kwargs=plans[label])
    return results


def _play_batch(agent: AgentLike, env: GlanceFocusVectorEnv, seed: int | None) -> tuple[torch.Tensor, dict]:
    """One batch of episodes (``gfenv.rollout.play_batch``): (T, 5, N) measurements after each step (see
    ``_measure``) and the last info; a batch whose slots all stopped early repeats its last row."""
    policy_macs = float(getattr(agent, "macs_per_step", 0) or 0)
    decisions = torch.zeros(env.num_envs, dtype=torch.float64, device=env.device)  # made so far, per slot
    deciding = torch.ones(env.num_envs, dtype=torch.bool, device=env.device)  # not ended before this step
    rows: list[torch.Tensor] = []

    def measure(obs: Any, info: dict) -> None:
        rows.append(_measure(env, info, decisions * policy_macs))

    def step(obs: Any, reward: torch.Tensor, info: dict, finished: torch.Tensor) -> None:
        decisions.add_(deciding.double())
        deciding.copy_(~finished)
        measure(obs, info)

    info = play_batch(agent, env, seed, on_reset=measure, on_step=step)
    rows += rows[-1:] * (env.steps - len(rows))
    return torch.stack(rows), info


@torch.no_grad()
def run_episodes(agent: AgentLike, env: GlanceFocusVectorEnv, episodes: int, seed: int,
                 on_batch: Callable[[int], Any] | None = None, record: bool = False) -> dict[str, Any]:
    """``evaluate`` for one agent on a built env (sequential sampling, autoreset disabled).

    Every batch runs T - 1 steps; a slot that stopped early is sent the stop action from then on. With ``record``
    the result also holds ``per_image``: (episodes, T) CPU tensors ``confidence`` (max softmax probability),
    ``correct`` (bool) and ``macs`` (cumulative multiply-adds, policy included) of every image after every step.
    """
    steps, n = env.steps, env.num_envs
    policy_macs = int(float(getattr(agent, "macs_per_step", 0) or 0))
    totals = torch.zeros(steps, 5, dtype=torch.float64, device=env.device)
    kept: list[torch.Tensor] = []
    counted = 0
    while counted < episodes:
        count = min(n, episodes - counted)
        measured, _ = _play_batch(agent, env, seed if counted == 0 else None)
        totals += measured[:, :, :count].sum(2)
        if record:
            kept.append(measured[:, :3, :count].permute(2, 0, 1).cpu())  # (count, T, 3)
        counted += count
        if on_batch is not None:
            on_batch(count)
    mean = (totals / episodes).cpu()
    result = {"accuracy": (100.0 * mean[:, 0]).tolist(), "macs": mean[:, 1].tolist(),
              "confidence": mean[:, 2].tolist(), "true_class_confidence": mean[:, 3].tolist(),
              "glimpses": mean[:, 4].tolist(), "episodes": episodes, "steps": steps, "action": env.action_mode,
              "stop_action": env.stop_action is not None,
              "policy_macs_per_step": policy_macs,
              "macs_parts": {"glance_encoder": env.macs["glance_encoder"], "focus_encoder": env.macs["focus_encoder"],
                             "classifier": env.macs["classifier"], "policy": policy_macs}}
    if record:
        per_image = torch.cat(kept)
        result["per_image"] = {"correct": per_image[:, :, 0].bool(), "macs": per_image[:, :, 1],
                               "confidence": per_image[:, :, 2]}
    return result


def _measure(env: GlanceFocusVectorEnv, info: dict[str, torch.Tensor], policy_macs: torch.Tensor) -> torch.Tensor:
    """(5, N): correct, cumulative MACs, max probability, true-class probability and glimpses of each slot."""
    true_prob = env.probs.gather(1, env.labels[:, None]).squeeze(1)
    return torch.stack([info["correct"].double(), info["macs"].double() + policy_macs, info["confidence"].double(),
                        true_prob.double(), info["glimpses"].double()])


@torch.no_grad()
def render_episodes(agent: AgentLike, env_kwargs: dict[str, Any], count: int, seed: int,
                    device: str | torch.device = "cpu", split: str = "test") -> dict[str, Any]:
    """Play the first ``count`` images of ``split`` with ``agent`` and draw them (``env.render_slot``): ``frames`` (one
    (H, W, 3) uint8 picture per image, patches numbered in order), ``labels``, ``predictions`` and ``glimpses``."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}.")
    env = GlanceFocusVectorEnv(num_envs=count, split=split, sampling="sequential", device=device,
                               autoreset_mode=AutoresetMode.DISABLED, render_mode="rgb_array",
                               **agent_env_kwargs(agent, env_kwargs))
    _, info = _play_batch(agent, env, seed)
    return {"frames": [env.render_slot(i) for i in range(count)], "labels": env.labels.tolist(),
            "predictions": info["prediction"].tolist(), "glimpses": env.t.tolist()}


def benchmark(make_agents: Callable[[int], dict[str, AgentLike]],
              env_kwargs: dict[str, Any] | Callable[[int], dict[str, Any]], episodes: int,
              seeds: Sequence[int], threshold_episodes: int = 0, num_envs: int = 250,
              device: str | torch.device = "cpu", progress: bool = True,
              score_fn: Callable[[dict[str, dict]], dict[str, list[float]]] | None = None,
              split: str = "test") -> dict[str, dict]:
    """``evaluate`` on ``split`` for every seed (``make_agents(seed)`` builds that seed's agents), summarised over
    seeds. ``env_kwargs`` may be a function of the seed (each seed's own task words, e.g. its own stage-1
    checkpoint).

    With ``threshold_episodes`` > 0 each agent also plays the first that many train images, which fit the
    budgeted batch classification thresholds (``gfenv.eval.budgeted.budgeted_curve``; cost: each image's own cumulative
    MACs at its exit step). ``score_fn(results)`` gives per-step scores per label (e.g. the oracle-normalised score).
    Returns ``summarise_seeds`` of the per-seed results.
    """
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("Give at least one seed.")
    if threshold_episodes < 0:
        raise ValueError(f"threshold_episodes must be >= 0 (0: no budgeted evaluation), got {threshold_episodes}.")
    per_seed: dict[int, dict[str, dict]] = {}
    bar = None
    try:
        for seed in seeds:
            agents = make_agents(seed)
            kwargs = env_kwargs(seed) if callable(env_kwargs) else env_kwargs
            if bar is None:
                total = len(seeds) * len(agents) * (episodes + threshold_episodes)
                bar = tqdm(total=total, unit="img", disable=not progress)
            record = threshold_episodes > 0
            results = evaluate(agents, kwargs, episodes, seed, num_envs, device, split=split, record=record,
                               bar=bar)
            if record:
                train = evaluate(agents, kwargs, threshold_episodes, seed, num_envs, device, split="train",
                                 record=True, bar=bar)
                for label, result in results.items():
                    test = result.pop("per_image")
                    result["budgeted"] = budgeted_curve(train[label]["per_image"]["confidence"], test["confidence"],
                                                        test["correct"], test["macs"])
            if score_fn is not None:
                for label, score in score_fn(results).items():
                    results[label]["score"] = score
            per_seed[seed] = results
    finally:
        if bar is not None:
            bar.close()
    return summarise_seeds(per_seed)


def oracle_normalised(results: dict[str, dict], random: str = "random", oracle: str = "oracle") -> dict[str, list]:
    """(agent - random) / (oracle - random) per step, in percent; NaN where oracle and random tie."""
    r, o = results[random]["accuracy"], results[oracle]["accuracy"]
    return {name: [100.0 * (a - ra) / (oa - ra) if oa != ra else float("nan")
                   for a, ra, oa in zip(res["accuracy"], r, o)] for name, res in results.items()}


def _mean_std(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    values = torch.tensor(rows, dtype=torch.float64)  # (seeds, T)
    std = values.std(0) if len(rows) > 1 else torch.zeros(values.shape[1], dtype=torch.float64)
    return values.mean(0).tolist(), std.tolist()


def summarise_seeds(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per agent label: the per-step lists (``accuracy``, ``macs``, ``confidence``, ``true_class_confidence``,
    ``glimpses``, ``score``) averaged over seeds, ``accuracy_std``, ``macs_std``, ``score_std`` (sample std over
    seeds, 0 for one seed), ``budgeted`` (per p: mean and std of ``macs`` and ``accuracy``), ``learned_stop``
    (agents with a stop action: their own final (MACs, accuracy) point), ``seeds`` and ``per_seed`` (each seed's
    ``accuracy``, ``macs``, ``score`` and full ``budgeted`` curve)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    summary: dict[str, dict] = {}
    for label, base in first.items():
        runs = [per_seed[s][label] for s in seeds]
        out = {k: v for k, v in base.items() if k not in (*PER_STEP_KEYS, "score", "budgeted", "per_image")}
        for key in (*PER_STEP_KEYS, "score"):
            if key in base:
                out[key], std = _mean_std([r[key] for r in runs])
                if key in SPREAD_KEYS:
                    out[f"{key}_std"] = std
        if "budgeted" in base:
            points = []
            for i, point in enumerate(base["budgeted"]):
                macs, macs_std = _mean_std([[r["budgeted"][i]["macs"]] for r in runs])
                acc, acc_std = _mean_std([[r["budgeted"][i]["accuracy"]] for r in runs])
                points.append({"p": point["p"], "macs": macs[0], "macs_std": macs_std[0], "accuracy": acc[0],
                               "accuracy_std": acc_std[0]})
            out["budgeted"] = points
        if base.get("stop_action"):
            out["learned_stop"] = {"macs": out["macs"][-1], "accuracy": out["accuracy"][-1],
                                   "glimpses": out["glimpses"][-1]}
        out["seeds"] = seeds
        out["per_seed"] = {str(s): {k: r[k] for k in ("accuracy", "macs", "score", "budgeted") if k in r}
                           for s, r in zip(seeds, runs)}
        summary[label] = out
    return summary


def _cell(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    if std is None or not np.isfinite(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def format_table(results: dict[str, dict]) -> str:
    """A text table: accuracy (%) per agent and glimpse, then cumulative MACs per image in millions. Results over
    several seeds (``summarise_seeds``) show mean ± std."""
    if not results:
        return "(no agents evaluated)"
    steps = max(len(r["accuracy"]) for r in results.values())
    several = any(len(r.get("seeds", ())) > 1 for r in results.values())

    def cells(r: dict, key: str, fmt: str, scale: float = 1.0) -> list[str]:
        std = r.get(f"{key}_std") if several else None
        values = [_cell(None if m is None else m * scale, None if s is None else s * scale, fmt)
                  for m, s in zip(r[key], std or [None] * len(r[key]))]
        return values + [""] * (steps - len(values))

    header = ["accuracy (%)"] + [f"t={t}" for t in range(1, steps + 1)]
    acc_rows = [[label, *cells(r, "accuracy", ".2f")] for label, r in results.items()]
    macs = {label: cells(r, "macs", ".2f", 1e-6) for label, r in results.items()}
    if len({tuple(m) for m in macs.values()}) == 1:
        mac_rows = [["MACs (M)", *next(iter(macs.values()))]]
    else:
        mac_rows = [[f"MACs (M) {label}", *m] for label, m in macs.items()]
    score_rows = [[f"score (%) {label}", *cells(r, "score", ".1f")] for label, r in results.items() if "score" in r]
    table = [header, *acc_rows, *mac_rows, *score_rows]
    widths = [max(len(row[c]) for row in table) for c in range(steps + 1)]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]).rstrip()

    rule = "-" * len(line(header))
    first = next(iter(results.values()))
    seeds = first.get("seeds", ())
    spread = f", mean ± std over seeds {', '.join(map(str, seeds))}" if several else ""
    title = (f"{first.get('episodes', '?')} {first.get('split', 'test')} images{spread}; column t: after step t of "
             f"the episode (t=1: the glance alone)")
    lines = [title, line(header), rule, *map(line, acc_rows), rule, *map(line, mac_rows)]
    if score_rows:
        lines += [rule, *map(line, score_rows)]
    return "\n".join(lines)
