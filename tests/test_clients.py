"""The tools RL people use, on gfenv with no workaround: rl-baselines3-zoo (train, enjoy, and gfenv's evaluation of
its runs), TorchRL's GymWrapper, Gymnasium's vector wrappers, and gfenv's episode statistics in SB3's logger."""

from __future__ import annotations

import collections
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import vector as vw

import gfenv
from gfenv.cli import evaluate as evaluate_agent
from gfenv.cli import train as train_agent
from gfenv.wrappers import EpisodeStatistics, numpy_view

ENV_ID = gfenv.ENV_ID
ZOO_RUN = "gfenv-GlanceFocus-v0"  # the zoo's name of the env: its run folders and final model


# ------------------------------------------------------------------------------------------- rl-baselines3-zoo
@pytest.fixture
def zoo(monkeypatch, tmp_path):
    """The zoo's train/enjoy entry points, run in this process as their plain commands would run; ``import gfenv``
    after the zoo (``--gym-packages gfenv``) installs gfenv's defaults, which ``install_if_imported`` repeats here
    (this process imported gfenv first)."""
    pytest.importorskip("rl_zoo3")
    import rl_zoo3.enjoy
    import rl_zoo3.train

    from gfenv.zoo import install_if_imported

    install_if_imported()
    monkeypatch.chdir(tmp_path)

    def run(module, *args):
        monkeypatch.setattr(sys, "argv", [module.__name__, *args])
        (module.train if module is rl_zoo3.train else module.enjoy)()

    return {"train": lambda *a: run(rl_zoo3.train, *a), "enjoy": lambda *a: run(rl_zoo3.enjoy, *a)}


def test_the_plain_zoo_command_trains_and_gfenv_evaluates_its_run(zoo, tmp_path, capsys):
    from rl_zoo3.exp_manager import ExperimentManager

    assert ExperimentManager._gfenv_installed
    zoo["train"]("--algo", "ppo", "--env", ENV_ID, "--gym-packages", "gfenv", "-n", "2048", "-f", "logs",
                 "--seed", "0", "--eval-freq", "1024", "--eval-episodes", "4", "--verbose", "0",
                 "--hyperparams", "n_envs:16", "n_steps:16", "batch_size:256", "n_epochs:1")
    run = tmp_path / "logs" / "ppo" / f"{ZOO_RUN}_1"
    assert (run / f"{ZOO_RUN}.zip").is_file() and (run / "best_model.zip").is_file()
    config = (run / ZOO_RUN / "config.yml").read_text()
    assert "MultiInputPolicy" in config and "gfenv.sb3.EpisodeStatisticsCallback" in config and "grid" in config
    monitor = (run / "0.monitor.csv").read_text().splitlines()  # one batched env, the zoo's monitor file
    assert monitor[1].split(",")[:7] == ["r", "l", "t", "correct", "macs", "first_correct", "correct_t1"]
    assert len(monitor) - 2 >= 2048 // 4 - 16  # episodes of 4 steps
    capsys.readouterr()
    out = tmp_path / "zoo.json"
    assert evaluate_agent.main(["--agents", f"random,zoo={run}", "--episodes", "16", "--json", str(out)]) == 0
    import json

    zoo_result = json.loads(out.read_text())["agents"]["zoo"]
    assert len(zoo_result["accuracy"]) == 5 and zoo_result["n_timesteps"] == 2048


def test_the_zoo_reads_gfenv_hyperparameters_for_split_ids_and_its_own_for_other_algorithms(zoo):
    from rl_zoo3.exp_manager import ExperimentManager

    def hyperparams(algo, env_id):
        manager = ExperimentManager(args=None, algo=algo, env_id=env_id, log_folder="logs")
        return manager.read_hyperparameters()[0]

    test_split = hyperparams("ppo", "gfenv/GlanceFocus-test-v0")
    assert test_split["env_kwargs"] == {"action": "grid"} and test_split["gamma"] == 0.7  # the task's block
    dqn = hyperparams("dqn", ENV_ID)  # no gfenv file: the zoo's default block, with the Dict-observation policy
    assert dqn["policy"] == "MultiInputPolicy" and "gfenv.sb3.EpisodeStatisticsCallback" in dqn["callback"]
    assert hyperparams("ppo", "CartPole-v1")["policy"] == "MlpPolicy"  # other envs: the zoo as it is


def test_the_zoo_enjoys_a_gfenv_run(zoo, tmp_path, capsys):
    assert train_agent.main(["--stage", "2", "--timesteps", "64", "--num-envs", "8", "--no-progress",
                             "--eval-freq", "-1", "--checkpoint-freq", "0",
                             "--hyperparams", "n_steps=8", "batch_size=32", "n_epochs=1"]) == 0
    run = tmp_path / "runs" / "ppo" / f"{ZOO_RUN}_1"
    assert yaml.safe_load((run / ZOO_RUN / "args.yml").read_text())["algo"] == "ppo"
    capsys.readouterr()
    zoo["enjoy"]("--algo", "ppo", "--env", ENV_ID, "--gym-packages", "gfenv", "-f", "runs", "--exp-id", "1",
                 "-n", "8", "--no-render", "--deterministic")
    assert "Episode Length 4" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------------- TorchRL
def _torchrl_env(convert: bool, **kwargs):
    from torchrl.envs import ActionMask, GymWrapper

    venv = gym.make_vec(ENV_ID, num_envs=4, action="grid", autoreset_mode="SameStep", seed=0, **kwargs)
    calls = collections.Counter()
    step = venv.step

    def counted(actions):
        calls[type(actions).__name__] += 1
        return step(actions)

    venv.step = counted
    env = GymWrapper(venv, convert_actions_to_numpy=convert)  # a TransformedEnv (TorchRL's VecGymEnvTransform)
    return env.append_transform(ActionMask()), calls


def test_torchrl_gym_wrapper_checks_specs_and_rolls_out_with_masks_and_tensor_actions():
    pytest.importorskip("torchrl")
    from torchrl.envs.utils import check_env_specs

    env, calls = _torchrl_env(convert=False)
    check_env_specs(env)
    rollout = env.rollout(9, break_when_any_done=False)
    assert rollout.batch_size == (4, 9)
    assert rollout["next", "step"].dtype == torch.float32 and rollout["glimpses"].dtype == torch.int64
    cells = rollout["action"].long().argmax(-1)  # one-hot rows, masked by ActionMask
    mask = rollout["action_mask"]
    assert mask.gather(2, cells[..., None]).all()  # every action was allowed
    done = rollout["next", "done"][0, :, 0]
    assert done.tolist() == [False, False, False, True] * 2 + [False]
    for episode in (cells[:, :4], cells[:, 4:8]):
        assert all(len(set(row.tolist())) == 4 for row in episode)  # no cell twice in an episode
    assert set(calls) == {"Tensor"}  # the actions reached the env as tensors


def test_torchrl_actions_round_trip_through_numpy_only_with_its_default_conversion():
    pytest.importorskip("torchrl")
    counts = collections.Counter()
    originals = torch.Tensor.numpy, torch.as_tensor

    def to_numpy(self, *args, **kwargs):
        counts["tensor->numpy"] += 1
        return originals[0](self, *args, **kwargs)

    def as_tensor(x, *args, **kwargs):
        counts["numpy->tensor"] += isinstance(x, np.ndarray)
        return originals[1](x, *args, **kwargs)

    found = {}
    for convert in (True, False):
        env, calls = _torchrl_env(convert)
        env.rollout(2)
        counts.clear()
        torch.Tensor.numpy, torch.as_tensor = to_numpy, as_tensor
        try:
            env.rollout(8, break_when_any_done=False)
        finally:
            torch.Tensor.numpy, torch.as_tensor = originals
        found[convert] = dict(counts)
    assert found[True] == {"tensor->numpy": 8, "numpy->tensor": 8} and found[False] == {"numpy->tensor": 0}


# ----------------------------------------------------------------------------------------- Gymnasium's wrappers
def test_gymnasium_statistics_and_normalisation_wrappers_run_through_the_numpy_view():
    env = gym.make_vec(ENV_ID, num_envs=4, autoreset_mode=AutoresetMode.SAME_STEP, seed=0)
    env = vw.DictInfoToList(vw.NormalizeReward(vw.RecordEpisodeStatistics(numpy_view(env))))
    obs, infos = env.reset(seed=0)
    assert isinstance(obs["glance"], np.ndarray) and isinstance(infos, list) and len(infos) == 4
    for _ in range(4):
        obs, reward, terminated, truncated, infos = env.step(env.action_space.sample())
    assert isinstance(reward, np.ndarray) and terminated.all() and np.isfinite(reward).all()
    assert all(i["episode"]["l"] == 4 and isinstance(i["correct"], (bool, np.bool_)) for i in infos)
    flat = vw.NormalizeObservation(numpy_view(gym.make_vec(ENV_ID, num_envs=4, observation="flat", seed=0)))
    flat.reset(seed=0)
    obs, *_ = flat.step(flat.action_space.sample())
    assert obs.shape == (4, flat.single_observation_space.shape[0]) and np.abs(obs).max() < 10


@pytest.mark.parametrize("mode", list(AutoresetMode))
@pytest.mark.parametrize("action", ["grid", "grid+stop"])
def test_episode_statistics_in_every_autoreset_mode(mode, action):
    env = EpisodeStatistics(gym.make_vec(ENV_ID, num_envs=6, action=action, autoreset_mode=mode, seed=1))
    env.reset(seed=1)
    gen = torch.Generator().manual_seed(0)
    seen = 0
    for t in range(12):
        actions = torch.randint(49, (6,), generator=gen)
        if action == "grid+stop" and t % 3 == 1:
            actions[:3] = 49  # stop
        obs, reward, terminated, truncated, info = env.step(actions)
        ended = terminated | truncated
        if "episode" in info:
            ep, mask = info["episode"], info["_episode"]
            seen += int(mask.sum())
            assert torch.equal(ep["correct"][mask], info.get("final_info", info)["correct"][mask])
            first = ep["first_correct"][mask]
            correct_at = ep["correct_at"][mask]
            assert torch.equal(correct_at[:, -1], ep["correct"][mask])  # a stopped episode keeps its answer
            never = first == 0
            assert not correct_at[never].any()
            rows = torch.arange(len(first))[~never]
            assert correct_at[rows, first[~never] - 1].all() and not any(
                correct_at[r, : int(f) - 1].any() for r, f in zip(rows, first[~never]))
        if mode == AutoresetMode.DISABLED and bool(ended.any()):
            env.reset(options={"reset_mask": ended})
    assert seen == len(env.episodes) > 0
    summary = env.summary()
    assert set(summary) >= {"return", "length", "accuracy", "accuracy_t1", "accuracy_t5", "macs", "never_correct"}
    if action == "grid":
        assert summary["length"] == 4 and summary["accuracy"] == summary["accuracy_t5"]


def test_sb3_logs_the_episode_statistics():
    from stable_baselines3 import PPO

    from gfenv.sb3 import EpisodeStatisticsCallback, to_sb3

    venv = to_sb3(num_envs=8, seed=0, action="grid")
    model = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=32, n_epochs=1, seed=0)
    recorded = {}
    model.learn(64, callback=EpisodeStatisticsCallback())
    model.logger.record = lambda key, value, **_: recorded.__setitem__(key, value)
    callback = EpisodeStatisticsCallback()
    callback.init_callback(model)
    callback.on_rollout_end()
    assert {"rollout/ep_correct_mean", "rollout/ep_accuracy_t1", "rollout/ep_accuracy_t5",
            "rollout/ep_macs_mean"} <= set(recorded)
    assert recorded["rollout/ep_accuracy_t5"] == recorded["rollout/ep_correct_mean"]
    episode = model.ep_info_buffer[-1]
    assert episode["l"] == 4 and {"first_correct", "correct_t1", "correct_t5"} <= set(episode)
