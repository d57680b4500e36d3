"""The learned-agent interface: agents that train on the env, save atomically, load back and act for evaluation.

Every trainable agent (the Stable-Baselines3 ones, GFNet's own PPO) subclasses ``LearnedAgent`` and registers, in the
one registry ``agents.base.AGENTS``, a builder taking ``(env_kwargs, num_envs, seed, device, hyperparams,
tensorboard_log)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, Protocol

from agents.base import AGENTS, Agent, AgentBuilder, register_agent


class TrainingCallback(Protocol):
    """What ``LearnedAgent.learn`` calls after every vector step of training (all slots stepped once).

    ``on_step`` gets the agent and its total timesteps so far (slot steps, summed over slots); returning False
    stops training. Framework-neutral, so the same evaluation and checkpoint callbacks serve every learned agent.
    """

    def on_step(self, agent: LearnedAgent, num_timesteps: int) -> bool: ...


class LearnedAgent(Agent):
    """An agent with trainable parameters.

    ``learn(n)`` trains for ``n`` more timesteps (slot steps; ``num_timesteps`` keeps counting across calls and
    across save/load, which is what ``--resume`` relies on). ``save(path)`` writes one file atomically (for the SB3
    agents a ``.zip``); ``load(path, device, **kwargs)`` rebuilds the agent from it, ready to ``act``, without
    unpickling anything (weights read with ``weights_only``; ``trust_pickled_zip=True`` is the explicit opt-in to a
    loader that unpickles, for SB3 zips from elsewhere); when
    ``kwargs`` holds ``num_envs`` (and ``seed``, ``tensorboard_log``) it also gets a fresh training env so that
    ``learn`` continues. ``act(obs, env)`` is deterministic (torch in, torch out on ``env.device``).
    ``macs_per_step`` is the policy network's multiply-adds per decision, measured with
    ``gfenv.flops.count_macs`` on one observation; ``env_kwargs`` the env settings the policy was trained on
    (action and observation mode, task), which the evaluator applies. ``checkpoint_suffix`` is the extension of
    the files ``save`` writes (``model``, ``last``, ``best_model`` in a run folder).
    """

    default_action: str = "continuous"
    num_timesteps: int = 0
    checkpoint_suffix: str = ".pt"

    def learn(self, total_timesteps: int, callbacks: list | None = None, progress_bar: bool = False) -> None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> LearnedAgent:
        raise NotImplementedError

    def log_scalars(self, values: dict[str, float], num_timesteps: int) -> None:
        """Write scalars (e.g. evaluation accuracy) to the agent's TensorBoard log; a no-op without one."""


def register_learned_agent(name: str, agent_class: type[LearnedAgent]) -> Callable[[AgentBuilder], AgentBuilder]:
    """``register_agent(name)`` for a builder function whose agents are ``agent_class`` (which knows how to load)."""

    def deco(builder: AgentBuilder) -> AgentBuilder:
        builder.agent_class = agent_class
        return register_agent(name)(builder)

    return deco


def learned_agent_class(name: str) -> type[LearnedAgent] | None:
    """The ``LearnedAgent`` class behind registered agent ``name``; None for a fixed baseline."""
    if name not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}. Valid agents: {', '.join(sorted(AGENTS))}.")
    builder = AGENTS[name]
    if isinstance(builder, type) and issubclass(builder, LearnedAgent):
        return builder
    cls = getattr(builder, "agent_class", None)
    if cls is None and "env_kwargs" in inspect.signature(builder).parameters:
        return LearnedAgent
    return cls


def is_learned(name: str) -> bool:
    """Whether registered agent ``name`` trains (and so takes the learned builders' arguments)."""
    return learned_agent_class(name) is not None


def learned_agent_names() -> list[str]:
    return sorted(n for n in AGENTS if is_learned(n))
