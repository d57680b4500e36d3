"""The learned-agent interface: agents that train on the env, save atomically, load back and act for evaluation.

Every trainable agent (the Stable-Baselines3 ones, GFNet's own PPO) subclasses ``LearnedAgent`` and registers, in the
one registry ``agents.base.AGENTS``, a builder taking ``(env_kwargs, num_envs, seed, device, hyperparams,
tensorboard_log)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml

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
    agents a ``.zip``); ``load(path, device, **kwargs)`` rebuilds the agent from it, ready to ``act``; when
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


def is_stage3_checkpoint(path: Path) -> bool:
    """Whether ``path`` names ``<run>/stage3/<file>.pt`` of a stage-2 run folder."""
    return path.suffix == ".pt" and path.parent.name == "stage3" and (path.parent.parent / "config.yml").is_file()


def run_folder(path: str | os.PathLike) -> Path:
    """The stage-2 run folder of a run folder, a checkpoint file in one, or its stage-3 checkpoint."""
    path = Path(path)
    if is_stage3_checkpoint(path):
        return path.parent.parent
    return path if path.is_dir() else path.parent


def load_agent(path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> LearnedAgent:
    """Load a trained agent from a run folder (its ``best_model``, else ``model``, else ``last``) or a file in one.

    The run folder's ``config.yml`` (written by ``train_agent.py --stage 2``) names the agent. A stage-3 checkpoint
    of a run, ``<run>/stage3/model.pt`` (written by ``train_agent.py --stage 3 --run-dir <run>``), loads the run's
    agent with that checkpoint as its env's model (``env_kwargs["checkpoint"]``): the policy with its fine-tuned
    classifier, as ``evaluate_agent.py --agents label=<run>/stage3/model.pt`` takes it.
    """
    path = Path(path)
    if is_stage3_checkpoint(path):
        if not path.is_file():
            raise FileNotFoundError(f"No stage-3 checkpoint {path}; write it with python train_agent.py --stage 3 "
                                    f"--run-dir {path.parent.parent}.")
        agent = load_agent(path.parent.parent, device=device, **kwargs)
        agent.env_kwargs = {**agent.env_kwargs, "checkpoint": str(path)}
        return agent
    run_dir = path if path.is_dir() else path.parent
    config_file = run_dir / "config.yml"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.yml in {run_dir}: point at a run folder written by train_agent.py "
                                f"--stage 2 (or use the agent class's load()).")
    config = yaml.safe_load(config_file.read_text())
    if path.is_dir():
        found = [f for f in sorted(run_dir.iterdir()) if f.stem in ("best_model", "model", "last")]
        if not found:
            raise FileNotFoundError(f"No best_model, model or last checkpoint in {run_dir}.")
        path = min(found, key=lambda f: ("best_model", "model", "last").index(f.stem))
    cls = learned_agent_class(config["agent"])
    if cls is None or cls is LearnedAgent:
        raise ValueError(f"Agent {config['agent']!r} of {run_dir} has no registered LearnedAgent class to load it.")
    return cls.load(path, device=device, **kwargs)
