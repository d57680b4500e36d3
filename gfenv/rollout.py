"""How an agent plays the batched env: the agent protocol and the one episode loop.

Evaluation, stage 3 and GFNet's own PPO all play whole batches of episodes (one image per slot) in lockstep through
``play_batch``; an agent is anything with ``reset(env)`` and ``act(obs, env)`` (``AgentLike``), optionally
``sample(obs, env)`` (stochastic actions), ``supported_actions``, ``macs_per_step`` and ``env_kwargs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

import torch

from gfenv.env import ACTION_MODES, GlanceFocusVectorEnv

FIXED_ENV_KWARGS = ("split", "sampling", "num_envs", "device", "seed", "autoreset_mode", "render_mode", "model",
                    "source")
"""Env arguments that whoever builds the env for an agent (evaluation, training, stage 3) sets itself: which images,
how many slots, where, how episodes restart; never part of an agent's or a run's env settings."""


class AgentLike(Protocol):
    """What playing needs of an agent. Optional attributes: ``sample(obs, env)`` (stochastic actions, stage 3),
    ``macs_per_step`` (policy multiply-adds per decision, default 0), ``supported_actions`` (the action modes it can
    produce) and ``env_kwargs`` (env settings it needs, applied over the shared ones)."""

    def reset(self, env: GlanceFocusVectorEnv) -> None: ...

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor: ...


def action_mode_error(name: str, supported: Iterable[str], action_mode: str) -> ValueError | None:
    """The error for an agent ``name`` that produces ``supported`` action modes asked to act in ``action_mode``
    (None when it can): it names the mode to build the env with."""
    supported = set(supported)
    if action_mode in supported:
        return None
    usable = [m for m in ACTION_MODES if m in supported] or sorted(supported)
    return ValueError(f"Agent {name!r} does not support action mode {action_mode!r}; build the env with "
                      f"action={usable[0]!r} (supported: {', '.join(usable)}).")


def check_action_mode(agent: Any, action_mode: str, label: str | None = None) -> None:
    """ValueError unless ``agent`` can act in ``action_mode`` (an agent without ``supported_actions`` acts in all)."""
    supported = getattr(agent, "supported_actions", None)
    if supported is None:
        return
    error = action_mode_error(label or getattr(agent, "name", type(agent).__name__), supported, action_mode)
    if error is not None:
        raise error


def agent_env_kwargs(agent: AgentLike, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The env settings ``agent`` runs with: the shared ones, then the agent's own (e.g. its action mode)."""
    return {**env_kwargs, **getattr(agent, "env_kwargs", {})}


def sampling_act(agent: AgentLike) -> Callable[[Any, Any], torch.Tensor]:
    """The agent's stochastic action: ``agent.sample(obs, env)``, else ``agent.act(obs, env, deterministic=False)``
    when ``act`` takes that keyword, else plain ``agent.act`` (the fixed baselines)."""
    sample = getattr(agent, "sample", None)
    if callable(sample):
        return sample
    if "deterministic" in inspect.signature(agent.act).parameters:
        return partial(agent.act, deterministic=False)
    return agent.act


StepHook = Callable[[Any, torch.Tensor, dict, torch.Tensor], bool | None]


def play_batch(agent: AgentLike, env: Any, seed: int | None = None,
               act: Callable[[Any, Any], torch.Tensor] | None = None, on_step: StepHook | None = None,
               on_reset: Callable[[Any, dict], None] | None = None) -> dict | None:
    """Play one batch of episodes, one image per slot, from ``env.reset(seed=seed)`` to their end; returns the last
    info (None when ``on_step`` returned False to stop early).

    ``env`` is a ``GlanceFocusVectorEnv`` with autoreset disabled, or a vector wrapper around one (e.g. stage 3's).
    ``act(obs, env)`` (default ``agent.act``) decides each step. A slot whose episode has ended (the stop action
    with ``action="grid+stop"``) is sent the stop action from then on, so it keeps its final prediction and no
    image is drawn out of turn; the loop ends when every slot has ended. ``on_reset(obs, info)`` sees the glance,
    ``on_step(obs, reward, info, finished)`` every step after it."""
    act = act or agent.act
    base = env.unwrapped
    obs, info = env.reset(seed=seed)
    agent.reset(env)
    if on_reset is not None:
        on_reset(obs, info)
    finished = torch.zeros(base.num_envs, dtype=torch.bool, device=base.device)
    for _ in range(base.steps - 1):
        actions = act(obs, env)
        if base.stop_action is not None:
            actions = torch.where(finished, base.stop_action, torch.as_tensor(actions, device=base.device))
        obs, reward, terminated, truncated, info = env.step(actions)
        finished = finished | terminated | truncated
        if on_step is not None and on_step(obs, reward, info, finished) is False:
            return None
        if base.stop_action is not None and bool(finished.all()):
            break
    return info
