"""Policies for the Glance-and-Focus env, built by name: ``make_agent("oracle")``.

``AGENTS`` is the one registry; ``register_agent(name)`` adds to it (baselines here, learned agents elsewhere).
"""

from __future__ import annotations

from agents.base import AGENTS, Agent, check_action_mode, make_agent, register_agent
from agents.baselines import CenterAgent, OracleAgent, RandomAgent, RasterAgent
from agents.learned import LearnedAgent, is_learned, learned_agent_class
from agents.sb3_agents import SB3_SPECS, SB3Agent

__all__ = ["AGENTS", "SB3_SPECS", "Agent", "CenterAgent", "LearnedAgent", "OracleAgent", "RandomAgent", "RasterAgent",
           "SB3Agent", "check_action_mode", "is_learned", "learned_agent_class", "make_agent",
           "register_agent"]
from agents import gfnet_ppo  # noqa: F401
