"""The agent interface: a policy that picks every slot's next focus location, one batch of decisions per step.

One registry (``AGENTS``, ``register_agent``, ``make_agent``) holds the fixed baselines and the learned agents alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from gfenv.env import ACTION_MODES, GlanceFocusVectorEnv
from gfenv.rollout import check_action_mode


class Agent:
    """Base class for agents (``gfenv.rollout.AgentLike`` is the duck type playing needs).

    ``reset(env)`` is called when a batch of episodes starts and ``act(obs, env)`` once per env step; ``act``
    returns actions on ``env.device``: (N,) long for the grid modes, (N, 2) float in [-1, 1] for ``continuous``.
    ``macs_per_step`` is the policy's own multiply-adds per decision (0 for the fixed baselines). ``env_kwargs``
    are env settings the agent needs (e.g. the observation mode it was trained on); the evaluator applies them
    over the shared ones.
    """

    name: str = "agent"
    supported_actions: frozenset[str] = frozenset(ACTION_MODES)
    macs_per_step: int = 0
    env_kwargs: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def check_env(self, env: GlanceFocusVectorEnv) -> None:
        """Refuse an env whose action mode this agent cannot produce, naming the mode to build it with."""
        check_action_mode(self, env.action_mode)

    def reset(self, env: GlanceFocusVectorEnv) -> None:
        self.check_env(env)

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed!r})"


AgentBuilder = Callable[..., Agent]
AGENTS: dict[str, AgentBuilder] = {}


def register_agent(name: str) -> Callable[[AgentBuilder], AgentBuilder]:
    """Decorator: register an agent class or factory under ``name``.

    Builders take keyword arguments only; ``make_agent`` forwards its kwargs (the evaluation CLI passes ``seed``).
    """

    def deco(builder: AgentBuilder) -> AgentBuilder:
        if AGENTS.get(name, builder) is not builder:
            raise ValueError(f"An agent named {name!r} is already registered ({AGENTS[name]!r}).")
        AGENTS[name] = builder
        return builder

    return deco


def make_agent(name: str, **kwargs: Any) -> Agent:
    """Build the agent registered as ``name``; an unknown name is refused with the list of valid ones."""
    if name not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}. Valid agents: {', '.join(sorted(AGENTS))}.")
    return AGENTS[name](**kwargs)
