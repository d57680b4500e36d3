"""The SB3 agents as gfenv agents: action-mode checks, deterministic torch actions, save/load round trips, the
default features extractor and the rl-zoo style hyperparameters."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import CombinedExtractor

from agents import AGENTS, SB3_SPECS, SB3Agent, is_learned, make_agent
from agents.features import GlanceFocusExtractor
from agents.sb3_agents import parse_policy_kwargs, sb3_kwargs
from gfenv import GlanceFocusVectorEnv
from gfenv.eval.evaluation import evaluate
from gfenv.flops import count_macs
from gfenv.train.runs import load_agent
from gfenv.train.stage2 import load_hyperparams

PPO_TINY = {"n_steps": 8, "batch_size": 16, "n_epochs": 1}
TINY = {"ppo": PPO_TINY, "maskable_ppo": PPO_TINY, "recurrent_ppo": PPO_TINY, "a2c": {"n_steps": 8},
        "trpo": {"n_steps": 8, "batch_size": 32}, "ars": {"n_delta": 2},
        "sac": {"learning_starts": 8, "buffer_size": 1000, "batch_size": 16},
        "qrdqn": {"learning_starts": 8, "buffer_size": 1000, "batch_size": 16}}


def _env(action: str, observation: str = "dict", n: int = 4) -> GlanceFocusVectorEnv:
    return GlanceFocusVectorEnv(num_envs=n, action=action, observation=observation, split="test", seed=0)


def _episode_actions(agent, env: GlanceFocusVectorEnv, seed: int = 0) -> list[torch.Tensor]:
    obs, _ = env.reset(seed=seed)
    agent.reset(env)
    actions = []
    for _ in range(env.steps - 1):
        a = agent.act(obs, env)
        actions.append(a)
        obs, *_ = env.step(a)
    return actions


def test_registry_holds_sb3_agents_and_baselines_still_build():
    assert set(SB3_SPECS) <= set(AGENTS)
    assert all(is_learned(name) for name in SB3_SPECS)
    assert not is_learned("random")
    assert make_agent("random", seed=0).name == "random"


@pytest.mark.parametrize(("name", "env_kwargs", "message"), [
    ("maskable_ppo", {"action": "continuous"},
     "'maskable_ppo' does not support action mode 'continuous'; build the env with action='grid' "
     "(supported: grid, grid+stop)"),
    ("qrdqn", {"action": "continuous"}, "'qrdqn' does not support action mode 'continuous'; build the env with "
     "action='grid'"),
    ("sac", {"action": "grid"}, "'sac' does not support action mode 'grid'; build the env with action='continuous'"),
    ("ars", {"observation": "dict"}, "observation='flat'"),
    ("ppo", {"split": "test"}, "split"),
])
def test_unsupported_settings_are_refused_with_what_to_use(name, env_kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_agent(name, env_kwargs=env_kwargs, num_envs=2)


def test_trained_agent_refuses_an_env_of_another_action_mode():
    agent = make_agent("ppo", env_kwargs={"action": "grid"}, num_envs=2, hyperparams=PPO_TINY)
    with pytest.raises(ValueError, match="trained with action='grid'"):
        agent.reset(_env("continuous", n=2))


@pytest.mark.parametrize(("name", "action", "observation"), [
    ("ppo", "grid", "dict"), ("sac", "continuous", "dict"), ("recurrent_ppo", "grid+stop", "dict"),
    ("maskable_ppo", "grid", "dict"), ("qrdqn", "grid", "dict"), ("ars", "continuous", "flat"),
])
def test_save_load_round_trip_gives_the_same_actions(tmp_path, name, action, observation):
    agent = make_agent(name, env_kwargs={"action": action}, num_envs=4, seed=0, hyperparams=TINY[name])
    assert agent.env_kwargs["observation"] == observation
    agent.learn(32)
    agent.save(tmp_path / "model.zip")
    loaded = SB3Agent.load(tmp_path / "model.zip")
    assert loaded.name == name and loaded.env_kwargs == agent.env_kwargs
    assert loaded.num_timesteps == agent.num_timesteps >= 32
    env = _env(action, observation)
    before, after = _episode_actions(agent, env), _episode_actions(loaded, env)
    for a, b in zip(before, after):
        assert a.device == env.device and torch.equal(a, b)
        if action == "continuous":
            assert a.dtype == torch.float32 and a.shape == (4, 2) and bool((a.abs() <= 1).all())
        else:
            n = env.single_action_space.n
            assert a.dtype == torch.long and a.shape == (4,) and bool(((a >= 0) & (a < n)).all())


def test_maskable_ppo_never_revisits_a_cell():
    agent = make_agent("maskable_ppo", env_kwargs={"action": "grid"}, num_envs=2, seed=0)
    env = _env("grid", n=16)
    cells = torch.stack(_episode_actions(agent, env), 1)  # (N, T-1)
    assert all(len(set(row.tolist())) == env.steps - 1 for row in cells)


def test_recurrent_ppo_starts_each_episode_from_a_fresh_lstm_state():
    agent = make_agent("recurrent_ppo", env_kwargs={"action": "grid"}, num_envs=2, seed=0, hyperparams=PPO_TINY)
    agent.learn(16)
    env = _env("grid")
    first = _episode_actions(agent, env)
    assert agent._lstm_states is not None
    again = _episode_actions(agent, env)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_macs_per_step_counts_the_policy_and_the_evaluator_reports_it():
    ppo = make_agent("ppo", env_kwargs={"action": "grid"}, num_envs=2, seed=0)
    lstm = make_agent("recurrent_ppo", env_kwargs={"action": "grid"}, num_envs=2, seed=0)
    lstm_weights = sum(p.numel() for n, p in lstm.model.policy.lstm_actor.named_parameters() if "weight" in n)
    one = {k: torch.zeros(1, *s.shape) for k, s in lstm.model.observation_space.spaces.items()}
    extractor = count_macs(lstm.model.policy.features_extractor, one)
    assert ppo.macs_per_step > extractor > 100_000
    assert lstm.macs_per_step > extractor + lstm_weights  # FlopCounterMode misses aten.lstm: added by hand
    result = evaluate({"ppo": ppo}, {}, episodes=4, seed=0, num_envs=4, progress=False)["ppo"]
    assert result["policy_macs_per_step"] == ppo.macs_per_step
    env = _env("grid", n=1)
    assert result["macs"][1] - result["macs"][0] == pytest.approx(env.focus_macs + ppo.macs_per_step)


def test_load_agent_reads_the_run_folder(tmp_path):
    agent = make_agent("a2c", env_kwargs={"action": "grid+stop"}, num_envs=2, seed=0)
    agent.save(tmp_path / "model.zip")
    with pytest.raises(FileNotFoundError, match=r"config\.yml"):
        load_agent(tmp_path)
    (tmp_path / "config.yml").write_text("agent: a2c\n")
    loaded = load_agent(tmp_path)
    assert isinstance(loaded, SB3Agent) and loaded.name == "a2c" and loaded.supported_actions == {"grid+stop"}


def test_glance_focus_extractor_reads_the_dict_observation():
    env = _env("grid", n=3)
    extractor = GlanceFocusExtractor(env.single_observation_space, env.glance_map_shape, features_dim=64)
    obs, _ = env.reset(seed=0)
    assert extractor(obs).shape == (3, 64)
    with pytest.raises(ValueError, match="glance_map_shape"):
        GlanceFocusExtractor(env.single_observation_space, (1, 2, 3))
    with pytest.raises(ValueError, match="observation='dict'"):
        GlanceFocusExtractor(spaces.Dict({"glance": spaces.Box(0, 1, (4,))}), (1, 2, 2))


def test_glance_focus_extractor_pools_only_maps_wider_than_eight():
    """A map within 8 x 8 skips the pooling (an identity there): the same features and gradients as pooling it to
    its own size, and the same parameters, so agents saved before load and act alike; a wider map is pooled."""
    env = _env("grid", n=3)
    torch.manual_seed(0)
    extractor = GlanceFocusExtractor(env.single_observation_space, env.glance_map_shape, features_dim=64)
    obs, _ = env.reset(seed=0)
    assert isinstance(extractor.glance_net[4], torch.nn.Identity)
    pooled = copy.deepcopy(extractor)
    pooled.glance_net[4] = torch.nn.AdaptiveAvgPool2d(env.glance_map_shape[1:])
    assert [k for k, _ in pooled.named_parameters()] == [k for k, _ in extractor.named_parameters()]
    outputs = []
    for net in (extractor, pooled):
        out = net(obs)
        out.square().sum().backward()
        outputs.append((out.detach(), [p.grad for p in net.parameters()]))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1], strict=True))
    wide = spaces.Dict({**env.single_observation_space.spaces, "glance": spaces.Box(0, 1, (2 * 12 * 12,))})
    big = GlanceFocusExtractor(wide, (2, 12, 12), features_dim=16, conv_channels=4)
    assert isinstance(big.glance_net[4], torch.nn.AdaptiveAvgPool2d) and big.head[0].in_features == 2 * 8 * 8 + 128


def test_user_policy_kwargs_extend_or_replace_the_default_extractor():
    agent = make_agent("ppo", num_envs=2, hyperparams={"policy_kwargs": "dict(net_arch=[32], activation_fn=nn.Tanh)"})
    policy = agent.model.policy
    assert isinstance(policy.features_extractor, GlanceFocusExtractor)
    assert policy.net_arch == [32] and policy.activation_fn is torch.nn.Tanh
    custom = {"policy_kwargs": {"features_extractor_class": CombinedExtractor}}
    agent = make_agent("ppo", num_envs=2, hyperparams=custom)
    assert isinstance(agent.model.policy.features_extractor, CombinedExtractor)
    flat = make_agent("ppo", env_kwargs={"observation": "flat"}, num_envs=2, hyperparams={"policy": "MultiInputPolicy"})
    assert type(flat.model.policy).__name__ == "ActorCriticPolicy"


def test_policy_kwargs_strings_are_parsed_without_eval():
    assert parse_policy_kwargs("dict(net_arch=dict(pi=[64], vf=[64]), ortho_init=False)") == {
        "net_arch": {"pi": [64], "vf": [64]}, "ortho_init": False}
    for bad in ("__import__('os').system('true')", "dict(a=open('x'))", "[1, 2]"):
        with pytest.raises(ValueError):
            parse_policy_kwargs(bad)


def test_linear_schedule_and_unknown_hyperparameters():
    agent = make_agent("ppo", num_envs=2, hyperparams={"learning_rate": "lin_1e-3", "n_steps": 8, "batch_size": 16})
    assert agent.model.lr_schedule(1.0) == pytest.approx(1e-3) and agent.model.lr_schedule(0.5) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="Unknown ppo hyperparameter.*learning_rat"):
        make_agent("ppo", num_envs=2, hyperparams={"learning_rat": 1e-3})


def test_hyperparameter_files_merge_default_env_block_and_overrides(tmp_path):
    (tmp_path / "ppo.yml").write_text(
        "default:\n  gamma: 0.9\n  n_envs: 8\n  env_kwargs:\n    action: grid\n    grid: 5\n"
        "gfenv/GlanceFocus-v0:\n  gamma: 0.7\n  env_kwargs:\n    grid: 7\n")
    hp = load_hyperparams("ppo", "gfenv/GlanceFocus-v0", {"n_steps": 4}, folder=tmp_path)
    assert hp == {"gamma": 0.7, "n_envs": 8, "env_kwargs": {"action": "grid", "grid": 7}, "n_steps": 4}
    assert load_hyperparams("ppo", "gfenv/Other-v0", folder=tmp_path)["gamma"] == 0.9
    assert load_hyperparams("nothing", folder=tmp_path) == {}


@pytest.mark.parametrize("name", sorted(SB3_SPECS))
def test_shipped_hyperparameter_files_are_valid(name):
    hp = load_hyperparams(name)
    env_kwargs = hp.pop("env_kwargs", {})
    assert hp.pop("n_envs") > 0 and hp.pop("n_timesteps") > 0
    assert env_kwargs.get("action", SB3_SPECS[name].default_action) in SB3_SPECS[name].supported_actions
    env = SimpleNamespace(observation_mode=env_kwargs.get("observation", "dict"), glance_map_shape=(128, 4, 4))
    policy, kwargs = sb3_kwargs(name, hp, env)
    assert policy in SB3_SPECS[name].algo.policy_aliases
    assert 0.5 <= kwargs.get("gamma", 0.99) <= 0.99
    assert np.isfinite(kwargs["learning_rate"](1.0) if callable(kwargs["learning_rate"]) else kwargs["learning_rate"])


def test_open_loop_agent_never_reads_what_a_patch_showed():
    agent = make_agent("open_loop", env_kwargs={}, num_envs=4, seed=0, hyperparams={"n_steps": 8, "batch_size": 32})
    assert agent.model.policy.features_extractor.vector_keys == ("visited", "step")
    env = GlanceFocusVectorEnv(num_envs=4, seed=0, split="test", **agent.env_kwargs)
    obs, _ = env.reset(seed=0)
    agent.reset(env)
    first = agent.act(obs, env)
    scrambled = {**obs, "focus": torch.randn_like(obs["focus"]), "memory": torch.randn_like(obs["memory"])}
    assert torch.equal(agent.act(scrambled, env), first)  # the same cells whatever the patches held
    closed = make_agent("maskable_ppo", env_kwargs={}, num_envs=4, seed=0, hyperparams={"n_steps": 8})
    assert closed.model.policy.features_extractor.vector_keys == ("focus", "memory", "visited", "step")
