"""gfenv: GFNet (Glance and Focus, NeurIPS 2020) as a batched Gymnasium environment.

``import gfenv`` registers the tasks of ``gfenv.task.TASKS`` with gymnasium: ``gfenv/GlanceFocus-v0`` (the quick
cluttered-glyphs task, stage-1 encoders shipped) and the tasks that read a local dataset (``data_root``) and a
stage-1 checkpoint trained for them. ``gymnasium.make`` gives the single env, ``gymnasium.make_vec`` the batched
torch env.
"""

from __future__ import annotations

from gfenv.data import register_dataset
from gfenv.env import GlanceFocusEnv, GlanceFocusVectorEnv
from gfenv.rewards import REWARDS, register_reward
from gfenv.task import TASKS, Task, register_builtin_tasks, register_task

__all__ = ["REWARDS", "TASKS", "GlanceFocusEnv", "GlanceFocusVectorEnv", "Task", "register_dataset",
           "register_reward", "register_task"]
__version__ = "0.1.0"

ENV_ID = "gfenv/GlanceFocus-v0"

register_builtin_tasks()

from gfenv.zoo import install_if_imported  # noqa: E402  (rl-baselines3-zoo: --gym-packages gfenv)

install_if_imported()
