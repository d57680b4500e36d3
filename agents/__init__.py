"""Policies for the Glance-and-Focus env, built by name: ``make_agent("oracle")``.

``AGENTS`` is the one registry; ``register_agent(name)`` adds to it (baselines here, learned agents elsewhere).
"""

from __future__ import annotations

from agents.base import AGENTS, Agent, check_action_mode, make_agent, register_agent
from agents.baselines import CenterAgent, OracleAgent, RandomAgent, RasterAgent

__all__ = ["AGENTS", "Agent", "CenterAgent", "OracleAgent", "RandomAgent", "RasterAgent", "check_action_mode",
           "make_agent", "register_agent"]
