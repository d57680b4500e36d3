"""Benchmark agents on a task's test split: accuracy and multiply-adds after each glimpse, on the same images.

Agents are duck-typed (``AgentLike``), so gfenv needs nothing from the ``agents`` package.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch
from gymnasium.vector.vector_env import AutoresetMode
from tqdm.auto import tqdm

from gfenv.env import ACTION_MODES, GlanceFocusVectorEnv

FIXED_ENV_KWARGS = ("split", "sampling", "num_envs", "device", "autoreset_mode")
DEFAULT_ACTION = inspect.signature(GlanceFocusVectorEnv).parameters["action"].default


class AgentLike(Protocol):
    """What ``evaluate`` needs of an agent. Optional attributes: ``macs_per_step`` (policy multiply-adds per
    decision, default 0), ``supported_actions`` (action modes it can produce) and ``env_kwargs`` (env settings it
    needs, applied over the shared ones)."""

    def reset(self, env: GlanceFocusVectorEnv) -> None: ...

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor: ...


def evaluate(agents: dict[str, AgentLike], env_kwargs: dict[str, Any], episodes: int, seed: int,
             num_envs: int = 250, device: str | torch.device = "cpu", progress: bool = True) -> dict[str, dict]:
    """Run every agent on the first ``episodes`` test images (in order, so all agents see the same ones).

    Returns, per agent label, lists over glimpses t = 1..T (t = 1 is the glance alone):
    ``accuracy`` (percent correct), ``macs`` (mean cumulative multiply-adds per image: the env's encoders and
    classifier plus the agent's ``macs_per_step`` per decision made), ``confidence`` (mean max softmax
    probability), ``true_class_confidence`` (mean softmax probability of the true class) and ``glimpses`` (mean
    glimpses taken, below t only for agents that stop early); plus ``episodes``, ``steps`` (T), ``action`` (the
    env's action mode), ``policy_macs_per_step`` and ``macs_parts`` (multiply-adds per image of one call of each part:
    glance encoder, focus encoder, classifier step, policy).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}.")
    plans = {label: {**env_kwargs, **getattr(agent, "env_kwargs", {})} for label, agent in agents.items()}
    for label, agent in agents.items():
        fixed = sorted(set(FIXED_ENV_KWARGS) & set(plans[label]))
        if fixed:
            raise ValueError(f"evaluate sets {', '.join(fixed)} itself (test split, sequential images); "
                             f"drop them from the env kwargs.")
        _check_action_mode(label, agent, plans[label].get("action", DEFAULT_ACTION))
    envs: dict[str, GlanceFocusVectorEnv] = {}
    results = {}
    for label, agent in agents.items():
        key = repr(sorted(plans[label].items()))
        if key not in envs:
            envs[key] = GlanceFocusVectorEnv(num_envs=min(num_envs, episodes), split="test", sampling="sequential",
                                             device=device, autoreset_mode=AutoresetMode.DISABLED, **plans[label])
        with tqdm(total=episodes, desc=label, unit="img", disable=not progress) as bar:
            results[label] = run_episodes(agent, envs[key], episodes, seed, bar.update)
    return results


def _check_action_mode(label: str, agent: AgentLike, action: str) -> None:
    supported = getattr(agent, "supported_actions", None)
    if supported is not None and action not in supported:
        usable = [m for m in ACTION_MODES if m in supported]
        raise ValueError(f"Agent {label!r} does not support action mode {action!r}; run it with env kwarg "
                         f"action={usable[0] if usable else '?'} (supported: {', '.join(usable)}).")


@torch.no_grad()
def run_episodes(agent: AgentLike, env: GlanceFocusVectorEnv, episodes: int, seed: int,
                 on_batch: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """``evaluate`` for one agent on a built env (test split, sequential sampling, autoreset disabled).

    Every batch runs T - 1 steps; a slot that stopped early is sent the stop action from then on, so it keeps its
    final prediction and MACs, and no autoreset draws images out of turn.
    """
    steps, n = env.steps, env.num_envs
    policy_macs = float(getattr(agent, "macs_per_step", 0) or 0)
    stop = env.grid * env.grid if env.action_mode == "grid+stop" else None
    totals = torch.zeros(steps, 5, dtype=torch.float64, device=env.device)
    counted = 0
    while counted < episodes:
        count = min(n, episodes - counted)
        obs, info = env.reset(seed=seed if counted == 0 else None)
        agent.reset(env)
        finished = torch.zeros(n, dtype=torch.bool, device=env.device)
        decisions = torch.zeros(n, dtype=torch.float64, device=env.device)
        rows = [_measure(env, info, decisions * policy_macs)]
        for _ in range(steps - 1):
            if bool(finished.all()):
                rows.append(rows[-1])
                continue
            actions = agent.act(obs, env)
            if stop is not None:
                actions = torch.where(finished, stop, torch.as_tensor(actions, device=env.device))
            decisions += (~finished).double()
            obs, _, terminated, truncated, info = env.step(actions)
            finished |= terminated | truncated
            rows.append(_measure(env, info, decisions * policy_macs))
        totals += torch.stack(rows)[:, :, :count].sum(2)
        counted += count
        if on_batch is not None:
            on_batch(count)
    mean = (totals / episodes).cpu()
    return {"accuracy": (100.0 * mean[:, 0]).tolist(), "macs": mean[:, 1].tolist(), "confidence": mean[:, 2].tolist(),
            "true_class_confidence": mean[:, 3].tolist(), "glimpses": mean[:, 4].tolist(), "episodes": episodes,
            "steps": steps, "action": env.action_mode, "policy_macs_per_step": int(policy_macs),
            "macs_parts": {"glance_encoder": env.macs["glance_encoder"], "focus_encoder": env.macs["focus_encoder"],
                           "classifier": env.macs["classifier"], "policy": int(policy_macs)}}


def _measure(env: GlanceFocusVectorEnv, info: dict[str, torch.Tensor], policy_macs: torch.Tensor) -> torch.Tensor:
    """(5, N): correct, cumulative MACs, max probability, true-class probability and glimpses of each slot."""
    true_prob = env.probs.gather(1, env.labels[:, None]).squeeze(1)
    return torch.stack([info["correct"].double(), info["macs"].double() + policy_macs, info["confidence"].double(),
                        true_prob.double(), info["step"].double()])


def format_table(results: dict[str, dict]) -> str:
    """A text table: accuracy (%) per agent and glimpse, then cumulative MACs per image in millions."""
    if not results:
        return "(no agents evaluated)"
    steps = max(len(r["accuracy"]) for r in results.values())

    def cells(values: list[float], fmt: str) -> list[str]:
        return [format(v, fmt) for v in values] + [""] * (steps - len(values))

    header = ["accuracy (%)"] + [f"t={t}" for t in range(1, steps + 1)]
    acc_rows = [[label, *cells(r["accuracy"], ".2f")] for label, r in results.items()]
    macs = {label: [m / 1e6 for m in r["macs"]] for label, r in results.items()}
    if len({tuple(m) for m in macs.values()}) == 1:
        mac_rows = [["MACs (M)", *cells(next(iter(macs.values())), ".2f")]]
    else:
        mac_rows = [[f"MACs (M) {label}", *cells(m, ".2f")] for label, m in macs.items()]
    table = [header, *acc_rows, *mac_rows]
    widths = [max(len(row[c]) for row in table) for c in range(steps + 1)]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]).rstrip()

    rule = "-" * len(line(header))
    episodes = next(iter(results.values())).get("episodes", "?")
    title = f"{episodes} test images; column t: after step t of the episode (t=1: the glance alone)"
    return "\n".join([title, line(header), rule, *map(line, acc_rows), rule, *map(line, mac_rows)])
