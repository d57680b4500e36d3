"""Stochastic actions of the learned agents (``sample``), which stage 3's frozen mode uses through ``sampling_act``:
they differ from ``act``, never pick a visited cell where the agent masks, and follow the agent's seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import make_agent
from gfenv import GlanceFocusVectorEnv
from gfenv.train.stage3 import sampling_act

PPO_TINY = {"n_steps": 8, "batch_size": 32, "n_epochs": 1}
CASES = [("maskable_ppo", "grid"), ("ppo", "continuous"), ("gfnet_ppo", "grid"), ("gfnet_ppo", "continuous")]


def _agent(name: str, action: str, seed: int = 0):
    kwargs = {} if name == "gfnet_ppo" else {"hyperparams": PPO_TINY}
    return make_agent(name, env_kwargs={"action": action}, num_envs=8, seed=seed, **kwargs)


def _env(agent, n: int = 32) -> GlanceFocusVectorEnv:
    return GlanceFocusVectorEnv(num_envs=n, split="test", seed=0, **agent.env_kwargs)


def _copy(agent, tmp_path):
    """The same policy through save/load (SB3 models cannot be deep-copied)."""
    path = tmp_path / f"agent{agent.checkpoint_suffix}"
    agent.save(path)
    return type(agent).load(path)


def _sampled_episode(agent, env: GlanceFocusVectorEnv) -> list[torch.Tensor]:
    obs, _ = env.reset(seed=0)
    agent.reset(env)
    actions = []
    for _ in range(env.steps - 1):
        actions.append(agent.sample(obs, env))
        obs, *_ = env.step(actions[-1])
    return actions


@pytest.mark.parametrize(("name", "action"), CASES)
def test_sample_differs_from_act_and_respects_the_masks(name, action, tmp_path):
    agent = _agent(name, action)
    agent.learn(256)  # trained a little: no longer the initial near-uniform policy
    greedy = _copy(agent, tmp_path)  # acts on the same observations, with its own recurrent state
    assert sampling_act(agent) == agent.sample
    env = _env(agent)
    obs, _ = env.reset(seed=0)
    agent.reset(env)
    greedy.reset(env)
    differ = 0
    for _ in range(env.steps - 1):
        a = greedy.act(obs, env)
        s = agent.sample(obs, env)
        assert s.shape == a.shape and s.dtype == a.dtype and s.device == env.device
        if action == "grid":
            assert env.action_masks()[np.arange(env.num_envs), s.cpu().numpy()].all()  # no visited cell
        else:
            assert bool(((s >= -1) & (s <= 1)).all())
        differ += int((s != a).reshape(env.num_envs, -1).any(1).sum())
        obs, *_ = env.step(s)
    assert differ > 0
    assert torch.equal(greedy.act(obs, env), agent.act(obs, env))  # sampling left act's policy as it was


@pytest.mark.parametrize(("name", "action"), [("maskable_ppo", "grid"), ("gfnet_ppo", "continuous")])
def test_samples_follow_the_seed_and_leave_global_rng_alone(name, action, tmp_path):
    first = _agent(name, action, seed=3)
    other = _copy(first, tmp_path)
    other.sample_generator.manual_seed(4)  # the same policy, other draws
    a = _sampled_episode(first, _env(first, 8))
    b = _sampled_episode(_agent(name, action, seed=3), _env(first, 8))
    c = _sampled_episode(other, _env(first, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    env = _env(first, 8)
    obs, _ = env.reset(seed=0)
    first.reset(env)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first.sample(obs, env)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
