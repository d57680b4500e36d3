"""Gymnasium's and Stable-Baselines3's env checkers pass, without a single warning, in every action/observation mode.

Also: ``gymnasium.make_vec`` gives the batched torch env itself, not a SyncVectorEnv of single envs.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import gfenv
from gfenv import GlanceFocusVectorEnv


def _no_warnings(check, *args, **kwargs) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(*args, **kwargs)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize("observation", ["dict", "gfnet", "flat"])
@pytest.mark.parametrize("action", ["continuous", "grid", "grid+stop"])
def test_checkers_pass_without_warnings(action, observation):
    env = gym.make(gfenv.ENV_ID, action=action, observation=observation)
    _no_warnings(gym_check_env, env.unwrapped)
    _no_warnings(sb3_check_env, env, warn=True)
    env.close()


def test_gymnasium_checker_with_rendering():
    env = gym.make(gfenv.ENV_ID, render_mode="rgb_array")
    _no_warnings(gym_check_env, env.unwrapped)
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype.name == "uint8" and frame.ndim == 3 and frame.shape[2] == 3


def test_make_vec_gives_the_batched_env():
    env = gym.make_vec(gfenv.ENV_ID, num_envs=4)
    assert isinstance(env, GlanceFocusVectorEnv) and env.num_envs == 4
    obs, info = env.reset(seed=0)
    assert obs["glance"].shape == (4, *env.single_observation_space["glance"].shape)
    for _ in range(env.steps):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert reward.shape == terminated.shape == truncated.shape == (4,)
        assert isinstance(reward, torch.Tensor) and not truncated.any()
    assert {"prediction", "confidence", "correct", "macs"} <= set(info)
