"""gfenv: GFNet (Glance and Focus, NeurIPS 2020) as a batched Gymnasium environment.

``import gfenv`` registers ``gfenv/GlanceFocus-v0``: the cluttered-glyphs task with the shipped stage-1 encoders.
``gymnasium.make`` gives the single env, ``gymnasium.make_vec`` the batched torch env. It also registers the tasks
of ``gfenv.task``, which need a local dataset (``data_root``) and a stage-1 checkpoint:
``gfenv/ClutteredMNIST60-v0``, ``gfenv/ClutteredMNIST100-v0``, ``gfenv/CIFAR10Canvas128-v0`` and
``gfenv/ImageNetResNet50P96-v0``.
"""

from __future__ import annotations

import gymnasium

from gfenv.env import GlanceFocusEnv, GlanceFocusVectorEnv
from gfenv.rewards import REWARDS, register_reward
from gfenv.task import VARIANTS, register_variants

__all__ = ["REWARDS", "VARIANTS", "GlanceFocusEnv", "GlanceFocusVectorEnv", "register_reward"]
__version__ = "0.1.0"

ENV_ID = "gfenv/GlanceFocus-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point="gfenv.env:GlanceFocusEnv",
                       vector_entry_point="gfenv.env:GlanceFocusVectorEnv")
register_variants()
