"""Stage 3: the wrapper fine-tunes on the policy's glimpses, swaps weights only between episodes, saves a checkpoint.

Small batches on the shipped default task (a 64-image train split where a fixed batch is needed).
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import pytest
import torch
from gymnasium.vector.vector_env import AutoresetMode
from stable_baselines3 import PPO

from agents import make_agent
from gfenv import GlanceFocusVectorEnv
from gfenv.checkpoint import load_model
from gfenv.cli import evaluate as evaluate_agent
from gfenv.env import DEFAULT_CHECKPOINT
from gfenv.glimpse import glance
from gfenv.sb3 import to_sb3
from gfenv.train.common import glimpse_loss
from gfenv.train.stage3 import Stage3Config, Stage3Wrapper, finetune

SMALL = {"checkpoint": "default", "dataset_kwargs": {"train_size": 64, "test_size": 32}}


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _run_batch(wrapper: Stage3Wrapper, agent, obs):
    """The T - 1 steps of one batch of lockstep episodes."""
    for _ in range(wrapper.steps - 1):
        obs, *_ = wrapper.step(agent.act(obs, wrapper))
    return obs


def test_finetuning_lowers_the_classifier_loss_on_the_policys_glimpses():
    env = GlanceFocusVectorEnv(num_envs=64, sampling="sequential", seed=0, **SMALL)
    before_model = copy.deepcopy(env.model)
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=64, batch_size=64))
    agent = make_agent("random", seed=0)
    obs, _ = wrapper.reset(seed=0)
    agent.reset(wrapper)
    images, labels = env.images.clone(), env.labels.clone()  # the whole 64-image train split, every episode
    obs = _run_batch(wrapper, agent, obs)
    corners = env.history.clone()  # (64, T-1, 2): the random policy's patches on the 64 train images
    for _ in range(19):
        obs, *_ = wrapper.step(agent.act(obs, wrapper))  # NEXT_STEP: the reset step
        obs = _run_batch(wrapper, agent, obs)
    assert wrapper.updates == 20
    with torch.no_grad():
        before = glimpse_loss(before_model, images, labels, corners, dsn_ratio=0.0)[0].item()
        after = glimpse_loss(env.model, images, labels, corners, dsn_ratio=0.0)[0].item()
    assert after < before - 0.05


def _glance_memory(env: GlanceFocusVectorEnv) -> torch.Tensor:
    """The classifier state after the glance of the env's current images, with the weights in ``env.model``."""
    m = env.model
    with torch.no_grad():
        feats, _ = m.glance_encoder(glance(env.images, env.patch_size, m.config.glance_mode))
        return m.classifier.step(feats, m.classifier.init_state(env.num_envs), 0)[1]


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_env_weights_change_only_between_episodes(mode):
    inner = AutoresetMode.DISABLED if mode == AutoresetMode.SAME_STEP else mode  # the wrapper resets it itself
    env = GlanceFocusVectorEnv(num_envs=8, seed=0, autoreset_mode=inner)
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=8), autoreset_mode=mode)
    agent = make_agent("random", seed=0)
    obs, _ = wrapper.reset(seed=0)
    agent.reset(wrapper)
    for _ in range(3):
        start = _weights(env.model)
        for s in range(env.steps - 1):
            obs, _, terminated, _, info = wrapper.step(agent.act(obs, wrapper))
            if s < env.steps - 2:
                assert torch.equal(_weights(env.model), start) and not terminated.any()
        assert terminated.all() and not torch.equal(_weights(env.model), start)
        if mode == AutoresetMode.SAME_STEP:
            assert "final_obs" in info
            assert torch.allclose(obs["memory"], _glance_memory(env), atol=1e-5)  # new episodes: new weights
        else:
            after = _weights(env.model)
            if mode == AutoresetMode.NEXT_STEP:
                obs, *_ = wrapper.step(agent.act(obs, wrapper))
            else:
                obs, _ = wrapper.reset()
            assert torch.equal(_weights(env.model), after)
            assert torch.allclose(obs["memory"], _glance_memory(env), atol=1e-5)
    assert wrapper.updates == 3 and env.model.training is False
    assert not any(p.requires_grad for p in env.model.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_updates_work_when_the_learner_steps_without_gradients(context):
    env = GlanceFocusVectorEnv(num_envs=8, seed=0)
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=8))
    classifier = _weights(env.model.classifier)
    with context():  # e.g. gfnet_ppo collects its rollouts under no_grad
        obs, _ = wrapper.reset(seed=0)
        _run_batch(wrapper, make_agent("random", seed=0), obs)
    assert wrapper.updates == 1 and not torch.equal(_weights(env.model.classifier), classifier)


def test_saved_checkpoint_gives_the_finetuned_predictions(tmp_path):
    env = GlanceFocusVectorEnv(num_envs=16, seed=0, autoreset_mode=AutoresetMode.DISABLED)
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=16, classifier_lr=0.05))
    agent = make_agent("random", seed=0)
    for _ in range(2):
        obs, _ = wrapper.reset()
        _run_batch(wrapper, agent, obs)
    path = wrapper.save(tmp_path / "stage3.pt")
    model, meta = load_model(path)
    assert meta["stage"] == 3 and meta["updates"] == 2 and meta["stage3"]["classifier_lr"] == 0.05

    def predictions(**kwargs) -> torch.Tensor:
        test = GlanceFocusVectorEnv(num_envs=16, split="test", sampling="sequential", **kwargs)
        obs, _ = test.reset(seed=0)
        center = make_agent("center")
        for _ in range(test.steps - 1):
            obs, *_ = test.step(center.act(obs, test))
        return test.probs

    loaded = predictions(checkpoint=path)
    assert torch.allclose(loaded, predictions(model=copy.deepcopy(env.model)), atol=1e-6)
    assert not torch.allclose(loaded, predictions(), atol=1e-3)


@pytest.mark.parametrize("options, changed", [
    ({}, {"classifier", "focus_encoder"}),  # GFNet's stage 3: the classifier and the focus encoder
    ({"train_focus": False}, {"classifier"}),
    ({"train_focus": True, "train_glance": True}, {"classifier", "focus_encoder", "glance_encoder"}),
    ({"train_classifier": False, "train_focus": True}, {"focus_encoder"}),
])
def test_what_is_trained_follows_the_config(options, changed):
    env = GlanceFocusVectorEnv(num_envs=8, seed=0)
    parts = ("classifier", "focus_encoder", "glance_encoder")
    before = {name: _weights(getattr(env.model, name)) for name in parts}
    stats = env.model.focus_encoder.state_dict()["features.1.running_mean"].clone()
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=8, **options))
    agent = make_agent("random", seed=0)
    obs, _ = wrapper.reset(seed=0)
    _run_batch(wrapper, agent, obs)
    assert {name for name in parts if not torch.equal(_weights(getattr(env.model, name)), before[name])} == changed
    assert torch.equal(env.model.focus_encoder.state_dict()["features.1.running_mean"], stats)  # BN kept in eval


def test_bn_batch_stats_option_updates_the_running_statistics():
    env = GlanceFocusVectorEnv(num_envs=8, seed=0)
    stats = env.model.focus_encoder.state_dict()["features.1.running_mean"].clone()
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=8, train_focus=True, bn_batch_stats=True))
    obs, _ = wrapper.reset(seed=0)
    _run_batch(wrapper, make_agent("random", seed=0), obs)
    assert not torch.equal(env.model.focus_encoder.state_dict()["features.1.running_mean"], stats)


def test_finetune_with_a_baseline_agent_saves_a_checkpoint_the_env_loads(tmp_path):
    path = finetune(make_agent("center"), SMALL, episodes=64, config=Stage3Config(update_every=32, batch_size=32),
                    seed=0, progress=False, path=tmp_path / "model.pt", num_envs=32)
    model, meta = load_model(path)
    shipped, _ = load_model(DEFAULT_CHECKPOINT)
    assert meta["stage"] == 3 and meta["agent"] == "center" and meta["updates"] == 2 and meta["episodes"] == 64
    assert not torch.equal(_weights(model.classifier), _weights(shipped.classifier))
    assert not torch.equal(_weights(model.focus_encoder), _weights(shipped.focus_encoder))
    assert torch.equal(_weights(model.glance_encoder), _weights(shipped.glance_encoder))
    env = GlanceFocusVectorEnv(num_envs=2, checkpoint=path, dataset_kwargs=SMALL["dataset_kwargs"])
    assert torch.equal(_weights(env.model.classifier), _weights(model.classifier))
    argv = ["--agents", "center", "--episodes", "8", "--num-envs", "8", "--no-progress", "--env-kwargs",
            f"checkpoint={path}"]
    assert evaluate_agent.main(argv) == 0


class EarlyStopper:
    """Grid+stop policy with a sampling method: odd slots stop after one patch; ``act`` must not be used."""

    name = "early_stopper"
    supported_actions = frozenset({"grid+stop"})

    def reset(self, env) -> None:
        self.samples = 0

    def act(self, obs, env) -> torch.Tensor:
        raise AssertionError("finetune must sample when the agent offers sample()")

    def sample(self, obs, env) -> torch.Tensor:
        self.samples += 1
        stop = env.grid * env.grid
        odd = torch.arange(env.num_envs, device=env.device) % 2 == 1
        return torch.where(odd & (env.t > 1), stop, env.t + 10)


def test_finetune_samples_and_learns_from_episodes_that_stop_early(tmp_path):
    agent = EarlyStopper()
    kwargs = {**SMALL, "action": "grid+stop"}
    path = finetune(agent, kwargs, episodes=16, config=Stage3Config(update_every=16), progress=False,
                    path=tmp_path / "m.pt", num_envs=16)
    assert agent.samples > 0 and load_model(path)[1]["episodes"] == 16
    with pytest.raises(ValueError, match="DISABLED"):
        Stage3Wrapper(GlanceFocusVectorEnv(num_envs=2, action="grid+stop"))


def test_patches_after_an_early_stop_do_not_count():
    model, _ = load_model(DEFAULT_CHECKPOINT)
    env = GlanceFocusVectorEnv(num_envs=4, seed=0, model=model)
    env.reset(seed=0)
    corners = torch.randint(0, 64, (4, env.steps - 1, 2))
    taken = torch.tensor([[True] * (env.steps - 1)] * 2 + [[True] + [False] * (env.steps - 2)] * 2)
    other = torch.where(taken[..., None], corners, torch.randint(0, 64, corners.shape))
    with torch.no_grad():
        a = glimpse_loss(model, env.images, env.labels, corners, taken=taken)[0]
        b = glimpse_loss(model, env.images, env.labels, other, taken=taken)[0]
        c = glimpse_loss(model, env.images, env.labels, other)[0]
    assert torch.allclose(a, b) and not torch.allclose(b, c)


def test_step_weights_last_scores_the_answer_an_episode_ends_on():
    model, _ = load_model(DEFAULT_CHECKPOINT)
    env = GlanceFocusVectorEnv(num_envs=4, seed=0, model=model)
    env.reset(seed=0)
    n = env.steps - 1
    corners = torch.randint(0, 64, (4, n, 2))

    def loss(k, **kw):  # over the glance and the first k patches
        return glimpse_loss(model, env.images, env.labels, corners[:, :k], **kw)[0]

    with torch.no_grad():  # the uniform loss is the mean over glimpses, so step t's term is a difference of means
        final_term = (n + 1) * loss(n) - n * loss(n - 1)
        second_term = 2 * loss(1) - loss(0)
        stopped = torch.tensor([[True] + [False] * (n - 1)] * 4)
        assert torch.allclose(loss(n, step_weights="last"), final_term, atol=1e-5)
        assert torch.allclose(loss(n, step_weights="last", taken=stopped), second_term, atol=1e-5)
        weights = torch.arange(1.0, n + 2)
        terms = torch.stack([(t + 1) * loss(t) - t * loss(t - 1) if t else loss(0) for t in range(n + 1)])
        assert torch.allclose(loss(n, step_weights="linear"), (weights * terms).sum() / weights.sum(), atol=1e-5)
    with pytest.raises(ValueError, match="step_weights"):
        Stage3Config(step_weights="first")


def test_joint_mode_ppo_learns_while_the_classifier_adapts():
    env = GlanceFocusVectorEnv(num_envs=4, seed=0, autoreset_mode=AutoresetMode.DISABLED)
    wrapper = Stage3Wrapper(env, Stage3Config(mode="joint", update_every=4), autoreset_mode=AutoresetMode.SAME_STEP)
    venv = to_sb3(wrapper)
    classifier = _weights(env.model.classifier)
    model = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=32, n_epochs=1, device="cpu", seed=0)
    policy = _weights(model.policy)
    model.learn(total_timesteps=32)
    assert wrapper.updates == 2 and len(model.ep_info_buffer) == 8
    assert not torch.equal(_weights(env.model.classifier), classifier)
    assert not torch.equal(_weights(model.policy), policy)
    assert env.autoreset_mode == AutoresetMode.DISABLED and wrapper.autoreset_mode == AutoresetMode.SAME_STEP


def test_readout_only_trains_the_classifiers_output_layer_and_keeps_the_state_the_policy_reads():
    env = GlanceFocusVectorEnv(num_envs=8, seed=0)
    head, rest = _weights(env.model.classifier.head), _weights(env.model.classifier.gru)
    wrapper = Stage3Wrapper(env, Stage3Config(update_every=8, readout_only=True, train_focus=False))
    obs, _ = wrapper.reset(seed=0)
    _run_batch(wrapper, make_agent("random", seed=0), obs)
    assert not torch.equal(_weights(env.model.classifier.head), head)
    assert torch.equal(_weights(env.model.classifier.gru), rest)
    with pytest.raises(ValueError, match="readout_only"):
        Stage3Config(readout_only=True)  # train_focus is on by default


def test_config_and_finetune_refuse_bad_settings():
    with pytest.raises(ValueError, match="nothing to train"):
        Stage3Config(train_classifier=False, train_focus=False)
    with pytest.raises(ValueError, match="mode"):
        Stage3Config(mode="both")
    with pytest.raises(ValueError, match="joint"):
        finetune(make_agent("random"), SMALL, episodes=4, config=Stage3Config(mode="joint"), progress=False)
    wrapper = Stage3Wrapper(GlanceFocusVectorEnv(num_envs=2, seed=0))
    with pytest.raises(gym.error.ResetNeeded):
        wrapper.step(torch.zeros(2, 2))
    wrapper.reset()
    with pytest.raises(RuntimeError, match="in progress"):
        wrapper.flush()


def test_memory_options_give_the_same_update():
    """Gradient accumulation, activation checkpointing and channels_last change the memory, not the update."""
    def one_update(**options):
        env = GlanceFocusVectorEnv(num_envs=16, sampling="sequential", seed=0, **SMALL)
        wrapper = Stage3Wrapper(env, Stage3Config(update_every=16, batch_size=16, train_focus=True, **options))
        agent = make_agent("random", seed=0)
        obs, _ = wrapper.reset(seed=0)
        agent.reset(wrapper)
        _run_batch(wrapper, agent, obs)
        assert wrapper.updates == 1
        return _weights(wrapper.trainable_model)

    plain = one_update()
    lean = one_update(accum_steps=4, grad_checkpointing=True, channels_last=True)
    torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-4)
    assert not torch.equal(plain, _weights(GlanceFocusVectorEnv(num_envs=1, **SMALL).model))  # it did learn


def _record_step_lrs(wrapper: Stage3Wrapper) -> list[list[float]]:
    """The learning rates of every group at each gradient step the wrapper takes (filled as it trains)."""
    seen, step = [], wrapper.optimizer.step

    def record(*args, **kwargs):
        seen.append([g["lr"] for g in wrapper.optimizer.param_groups])
        return step(*args, **kwargs)

    wrapper.optimizer.step = record
    return seen


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_is_applied_at_every_gradient_step(schedule):
    """lr_schedule='cosine': step k of the run at base * (1 + cos(pi * episodes done / schedule_episodes)) / 2, so
    the first step takes the full rates and the run ends with the rates at 0; 'constant' keeps them throughout."""
    env = GlanceFocusVectorEnv(num_envs=16, sampling="sequential", seed=0, **SMALL)
    cfg = Stage3Config(update_every=16, batch_size=8, train_focus=True, classifier_lr=0.02, encoder_lr=0.004,
                       lr_schedule=schedule, schedule_episodes=64)
    wrapper = Stage3Wrapper(env, cfg)
    seen = _record_step_lrs(wrapper)
    agent = make_agent("random", seed=0)
    obs, _ = wrapper.reset(seed=0)
    agent.reset(wrapper)
    for _ in range(4):  # 4 updates of 16 episodes, 2 gradient steps each: episodes done 0, 8, 16, ..., 56
        obs = _run_batch(wrapper, agent, obs)
        obs, *_ = wrapper.step(agent.act(obs, wrapper))  # NEXT_STEP: the reset step
    assert wrapper.updates == 4 and len(seen) == 8
    factors = [0.5 * (1 + math.cos(math.pi * k * 8 / 64)) for k in range(8)] if schedule == "cosine" else [1.0] * 8
    assert [lr[0] for lr in seen] == pytest.approx([0.02 * f for f in factors])
    assert [lr[1] for lr in seen] == pytest.approx([0.004 * f for f in factors])
    after = [g["lr"] for g in wrapper.optimizer.param_groups]
    assert after == (pytest.approx([0.0, 0.0], abs=1e-12) if schedule == "cosine" else [0.02, 0.004])
    if schedule == "cosine":  # past the schedule the rates stay at 0: the weights no longer move
        frozen = _weights(wrapper.trainable_model)
        _run_batch(wrapper, agent, obs)
        assert seen[-1] == [0.0, 0.0] and torch.equal(_weights(wrapper.trainable_model), frozen)


def test_lr_schedule_settings_are_checked():
    with pytest.raises(ValueError, match="lr_schedule"):
        Stage3Config(lr_schedule="step")
    with pytest.raises(ValueError, match="schedule_episodes"):
        Stage3Config(schedule_episodes=-1)
    with pytest.raises(ValueError, match="schedule_episodes"):  # a bare wrapper has no run length to span
        Stage3Wrapper(GlanceFocusVectorEnv(num_envs=2, seed=0, **SMALL), Stage3Config(lr_schedule="cosine"))


def test_finetune_spans_the_cosine_schedule_over_the_episodes_it_runs(tmp_path):
    """40 episodes asked in batches of 16 run 48: the schedule spans those, recorded in the checkpoint."""
    path = finetune(make_agent("random", seed=0), SMALL, episodes=40, num_envs=16, progress=False,
                    config=Stage3Config(update_every=16, batch_size=16, lr_schedule="cosine"), path=tmp_path / "m.pt")
    _, meta = load_model(path)
    assert meta["episodes"] == 48
    assert meta["stage3"]["lr_schedule"] == "cosine" and meta["stage3"]["schedule_episodes"] == 48


class Spy:
    """Grid policy that counts which of its two ways of acting finetune uses."""

    name = "spy"
    supported_actions = frozenset({"grid"})

    def __init__(self):
        self.calls = {"act": 0, "sample": 0}

    def reset(self, env) -> None:
        pass

    def act(self, obs, env) -> torch.Tensor:
        self.calls["act"] += 1
        return env.t + 3

    def sample(self, obs, env) -> torch.Tensor:
        self.calls["sample"] += 1
        return env.t + 5


@pytest.mark.parametrize("actions", ["sampled", "deterministic"])
def test_finetune_plays_the_policy_as_its_actions_setting_says(actions, tmp_path):
    spy = Spy()
    finetune(spy, {**SMALL, "action": "grid"}, episodes=8, config=Stage3Config(update_every=8, actions=actions),
             seed=0, progress=False, path=tmp_path / "model.pt", num_envs=8)
    used, unused = ("sample", "act") if actions == "sampled" else ("act", "sample")
    assert spy.calls[used] > 0 and spy.calls[unused] == 0
    with pytest.raises(ValueError, match="actions"):
        Stage3Config(actions="greedy")
