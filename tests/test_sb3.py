"""The SB3 adapter: PPO and MaskablePPO learn through it, and it keeps SB3's VecEnv contract.

Tiny budgets on the shipped default task; nothing here depends on the checkpoint's accuracy.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector.vector_env import AutoresetMode
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, VecMonitor

from gfenv import GlanceFocusVectorEnv
from gfenv.sb3 import SB3VecEnv, to_sb3
from gfenv.train.stage3 import Stage3Config, Stage3Wrapper

PPO_KW = {"n_steps": 8, "batch_size": 32, "n_epochs": 1, "device": "cpu"}


def _random_actions(venv: VecEnv, rng: np.random.Generator) -> np.ndarray:
    space = venv.action_space
    if isinstance(space, gym.spaces.Box):
        return rng.uniform(-1.0, 1.0, (venv.num_envs, *space.shape)).astype(np.float32)
    return rng.integers(0, space.n, venv.num_envs)


def test_to_sb3_builds_a_monitored_vecenv():
    venv = to_sb3(num_envs=3, seed=0)
    assert isinstance(venv, VecMonitor) and isinstance(venv.venv, SB3VecEnv)
    assert venv.num_envs == 3 and venv.venv.base.autoreset_mode == AutoresetMode.SAME_STEP
    assert isinstance(to_sb3(num_envs=2, monitor=False), SB3VecEnv)
    assert venv.get_attr("observation_space") == [venv.observation_space] * 3
    assert venv.get_attr("render_mode") == [None] * 3 and venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    assert not venv.has_attr("action_masks")  # continuous actions: no masks, so MaskablePPO is not offered any
    venv.set_attr("mac_cost_note", 1)
    assert venv.get_attr("mac_cost_note", indices=[1]) == [1]
    with pytest.raises(ValueError, match="all slots share"):
        venv.set_attr("mac_cost_note", 2, indices=[0])
    with pytest.raises(ValueError, match="SAME_STEP"):
        to_sb3(num_envs=2, autoreset_mode=AutoresetMode.NEXT_STEP)


def test_given_env_must_present_same_step_and_needs_reset():
    env = GlanceFocusVectorEnv(num_envs=2, seed=0)
    with pytest.raises(TypeError, match="one or the other"):
        to_sb3(env, num_envs=2)
    with pytest.raises(ValueError, match="autoreset_mode=AutoresetMode.SAME_STEP"):
        to_sb3(env)  # built on NEXT_STEP: refused, not switched behind the caller's back
    assert env.autoreset_mode == AutoresetMode.NEXT_STEP
    with pytest.raises(ValueError, match="autoreset_mode=AutoresetMode.SAME_STEP"):
        to_sb3(gym.wrappers.vector.RecordEpisodeStatistics(env))
    with pytest.raises(TypeError, match="needs a GlanceFocusVectorEnv"):
        to_sb3(gym.make_vec("CartPole-v1", num_envs=2))
    venv = to_sb3(GlanceFocusVectorEnv(num_envs=2, seed=0, autoreset_mode=AutoresetMode.SAME_STEP), monitor=False)
    with pytest.raises(gym.error.ResetNeeded):
        venv.step(np.zeros((2, 2), np.float32))
    venv.reset()
    venv.step(np.zeros((2, 2), np.float32))


def test_ppo_multi_input_learns_and_evaluates():
    venv = to_sb3(num_envs=8, seed=0)
    model = PPO("MultiInputPolicy", venv, seed=0, **PPO_KW).learn(256)
    assert model.num_timesteps >= 256 and len(model.ep_info_buffer) > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean, std = evaluate_policy(model, venv, n_eval_episodes=8)
        rewards, lengths = evaluate_policy(model, venv, n_eval_episodes=8, return_episode_rewards=True)
    assert not [str(w.message) for w in caught]
    assert np.isfinite(mean) and np.isfinite(std)
    assert len(rewards) == 8 and np.all(np.isfinite(rewards))
    assert set(lengths) == {venv.get_attr("steps")[0] - 1}


@pytest.mark.parametrize("action", ["grid", "grid+stop"])
def test_maskable_ppo_never_picks_a_masked_cell(action):
    venv = to_sb3(num_envs=4, seed=1, action=action)
    assert venv.has_attr("action_masks")
    adapter = venv.venv
    seen, masked, step_async = [], [], adapter.step_async

    def checked(actions: np.ndarray) -> None:
        masks = np.stack(venv.env_method("action_masks"))
        assert masks.shape == (4, venv.action_space.n) and masks.dtype == bool
        seen.append(masks[np.arange(4), actions])
        masked.append(int((~masks).sum()))
        step_async(actions)

    adapter.step_async = checked
    MaskablePPO("MultiInputPolicy", venv, seed=0, **PPO_KW).learn(160)
    assert len(seen) >= 40 and np.all(seen) and sum(masked) > 0
    masks = np.stack(venv.env_method("action_masks", indices=[2, 3]))
    assert masks.shape == (2, venv.action_space.n)


@pytest.mark.parametrize("observation", ["dict", "flat"])
def test_terminal_observation_at_episode_end(observation):
    venv = to_sb3(num_envs=3, seed=2, observation=observation)
    steps = venv.get_attr("steps")[0]
    space, rng = venv.observation_space, np.random.default_rng(0)
    obs = venv.reset()
    for t in range(1, steps):
        prev = obs
        obs, rewards, dones, infos = venv.step(_random_actions(venv, rng))
        assert rewards.dtype == np.float32 and rewards.shape == (3,)
        assert all({"prediction", "confidence", "correct", "macs"} <= set(info) for info in infos)
        assert dones.all() == (t == steps - 1)
    for i, info in enumerate(infos):
        term = info["terminal_observation"]
        assert info["TimeLimit.truncated"] is False and info["episode"]["l"] == steps - 1
        assert info["episode"]["correct"] == info["correct"] and info["episode"]["macs"] == info["macs"]
        assert isinstance(info["correct"], bool) and 0.0 <= info["confidence"] <= 1.0 and info["macs"] > 0
        if observation == "dict":
            assert set(term) == set(space.spaces)
            assert all(term[k].shape == space[k].shape and term[k].dtype == np.float32 for k in term)
            assert term["step"][0] == 1.0 and obs["step"][i, 0] == pytest.approx(1 / steps)
            np.testing.assert_array_equal(term["glance"], prev["glance"][i])  # not the next episode's glance
        else:
            assert term.shape == space.shape and term.dtype == np.float32
            assert term[-1] == 1.0 and obs[i, -1] == pytest.approx(1 / steps)
        assert space.contains(term)


def test_infos_hold_each_slots_values_as_python_scalars():
    """Every slot's info is its column of the vector info, as plain Python numbers; an ended slot's info is the
    finished episode's, with its accuracy after each glimpse and first correct glimpse from EpisodeStatistics."""
    venv = to_sb3(num_envs=5, seed=1, action="grid+stop", monitor=False)
    seen = {}
    inner_step = venv.env.step

    def step(actions):
        out = inner_step(actions)
        seen["info"] = out[4]
        return out

    venv.env.step = step
    venv.reset()
    stop = venv.action_space.n - 1
    for actions in ([stop, 0, 1, stop, 2], [3, 4, stop, 5, 6]):
        _, _, dones, infos = venv.step(np.array(actions))
        info = seen["info"]
        for i, slot in enumerate(infos):
            source = info["final_info"] if dones[i] else info
            for key in ("prediction", "confidence", "correct", "macs", "glimpses"):
                assert slot[key] == source[key][i].item() and type(slot[key]) is type(source[key][i].item())
            assert ("terminal_observation" in slot) == bool(dones[i])
            if dones[i]:
                episode = info["episode"]
                assert slot["first_correct"] == int(episode["first_correct"][i])
                assert [slot[f"correct_t{k + 1}"] for k in range(venv.get_attr("steps")[0])] == \
                    episode["correct_at"][i].tolist()
                assert slot["TimeLimit.truncated"] is False and type(slot["first_correct"]) is int


def test_early_stop_resets_only_the_finished_slot():
    venv = to_sb3(num_envs=3, seed=3, action="grid+stop")
    stop = venv.action_space.n - 1
    venv.reset()
    obs, _, dones, infos = venv.step(np.array([stop, 0, 1]))
    assert dones.tolist() == [True, False, False]
    assert "terminal_observation" in infos[0] and "terminal_observation" not in infos[1]
    assert infos[0]["episode"]["l"] == 1 and infos[0]["glimpses"] == 1
    assert obs["visited"][0].sum() == 0 and obs["visited"][1].sum() == 1
    assert np.stack(venv.env_method("action_masks"))[0].all()


def test_observations_are_float32_and_inside_the_space():
    venv = to_sb3(num_envs=4, seed=4, action="grid")
    space, rng = venv.observation_space, np.random.default_rng(1)
    obs = venv.reset()
    for _ in range(6):
        assert all(v.dtype == np.float32 and v.shape == (4, *space[k].shape) for k, v in obs.items())
        assert space.contains({k: v[0] for k, v in obs.items()})
        obs, *_ = venv.step(_random_actions(venv, rng))


def _rollout(seed: int, n: int = 9) -> tuple[list, np.ndarray]:
    venv = to_sb3(num_envs=4)
    venv.seed(seed)
    obs, rng = [venv.reset()], np.random.default_rng(0)
    rewards = []
    for _ in range(n):
        o, r, *_ = venv.step(_random_actions(venv, rng))
        obs.append(o)
        rewards.append(r)
    return obs, np.stack(rewards)


def test_same_seed_same_rollouts():
    obs_a, rew_a = _rollout(7)
    obs_b, rew_b = _rollout(7)
    obs_c, _ = _rollout(8)
    np.testing.assert_array_equal(rew_a, rew_b)
    for a, b in zip(obs_a, obs_b):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(obs_a[0]["glance"], obs_c[0]["glance"])


def test_same_seed_same_ppo_rollout_buffer():
    buffers = []
    for _ in range(2):
        model = PPO("MultiInputPolicy", to_sb3(num_envs=4), seed=11, **PPO_KW).learn(32)
        buffers.append((model.rollout_buffer.rewards.copy(), model.rollout_buffer.actions.copy()))
    np.testing.assert_array_equal(buffers[0][0], buffers[1][0])
    np.testing.assert_array_equal(buffers[0][1], buffers[1][1])


@pytest.mark.parametrize("observation", ["flat", "gfnet"])
def test_mlp_policy_on_flat_observations(observation):
    venv = to_sb3(num_envs=4, seed=5, observation=observation)
    obs = venv.reset()
    assert isinstance(obs, np.ndarray) and obs.dtype == np.float32 and obs.shape == (4, *venv.observation_space.shape)
    assert venv.observation_space.contains(obs[0])
    model = PPO("MlpPolicy", venv, seed=0, **PPO_KW).learn(96)
    mean, std = evaluate_policy(model, venv, n_eval_episodes=4)
    assert np.isfinite(mean) and np.isfinite(std)


def test_render_gives_one_frame_per_slot():
    venv = to_sb3(num_envs=4, seed=6, render_mode="rgb_array")
    venv.reset()
    venv.step(np.zeros((4, 2), np.float32))
    frames = venv.get_images()
    assert len(frames) == 4 and all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 for f in frames)
    h, w, _ = frames[0].shape
    assert venv.render().shape == (2 * h, 2 * w, 3)
    assert [f.shape for f in venv.env_method("render", indices=[1])] == [(h, w, 3)]
    quiet = to_sb3(num_envs=2, seed=6)
    with pytest.warns(UserWarning, match="render_mode"):
        assert quiet.get_images() == [None, None]


def _fixed_rollout(venv: VecEnv, steps: int) -> tuple[np.ndarray, list]:
    """Rewards and infos of ``steps`` steps with the same grid cells in every slot (cells 0, 5, 10, ...)."""
    venv.reset()
    rewards, infos = [], []
    for t in range(steps):
        _, r, _, info = venv.step(np.full(venv.num_envs, 5 * t % venv.action_space.n))
        rewards.append(r)
        infos.append(info)
    return np.stack(rewards), infos


def test_gymnasium_vector_wrapper_is_stepped_and_attributes_come_through():
    def env():
        return GlanceFocusVectorEnv(num_envs=4, seed=0, action="grid", autoreset_mode=AutoresetMode.SAME_STEP)

    bare = to_sb3(env())
    scaled = to_sb3(gym.wrappers.vector.TransformReward(env(), lambda r: 3.0 * r))
    assert scaled.has_attr("action_masks") and scaled.get_attr("steps") == bare.get_attr("steps")
    assert scaled.env_is_wrapped(gym.wrappers.vector.TransformReward) == [True] * 4
    assert bare.env_is_wrapped(gym.wrappers.vector.TransformReward) == [False] * 4
    steps = 2 * (bare.get_attr("steps")[0] - 1)  # two episodes
    rewards, infos = _fixed_rollout(bare, steps - 1)  # the second episode still in progress
    rewards3, infos3 = _fixed_rollout(scaled, steps - 1)
    assert np.abs(rewards).sum() > 0
    np.testing.assert_allclose(rewards3, 3.0 * rewards, rtol=1e-6)
    ended = steps // 2 - 1
    assert [i["episode"]["r"] for i in infos3[ended]] == pytest.approx([3 * i["episode"]["r"] for i in infos[ended]])
    masks = np.stack(scaled.env_method("action_masks"))
    assert not masks.all()  # cells visited in the episode in progress are masked
    np.testing.assert_array_equal(masks, np.stack(bare.env_method("action_masks")))
    conf = scaled.env_method("cell_confidences", indices=[1, 3])
    assert len(conf) == 2 and conf[0].shape == (scaled.action_space.n,)
    scaled.set_attr("mac_cost_note", 1)
    assert scaled.get_attr("mac_cost_note") == [1] * 4


def test_stage3_wrapper_is_stepped_and_its_updates_reach_the_rewards():
    """One update after the first batch of episodes: the second batch's rewards come from the new weights."""
    def run(lr: float) -> tuple[np.ndarray, Stage3Wrapper]:
        env = GlanceFocusVectorEnv(num_envs=4, seed=0, action="grid", autoreset_mode=AutoresetMode.DISABLED)
        wrapper = Stage3Wrapper(env, Stage3Config(update_every=4, batch_size=4, classifier_lr=lr, weight_decay=0.0),
                                autoreset_mode=AutoresetMode.SAME_STEP)  # it resets the env itself
        venv = to_sb3(wrapper)
        rewards, _ = _fixed_rollout(venv, 2 * (env.steps - 1))
        return rewards, wrapper

    still, frozen = run(0.0)
    moved, learning = run(1.0)
    with pytest.raises(ValueError, match="needs the env built with autoreset_mode='Disabled'"):
        Stage3Wrapper(GlanceFocusVectorEnv(num_envs=2), autoreset_mode=AutoresetMode.SAME_STEP)
    assert frozen.updates == learning.updates == 2 and learning.episodes == 8
    half = len(still) // 2
    np.testing.assert_array_equal(moved[:half], still[:half])
    assert not np.allclose(moved[half:], still[half:])
