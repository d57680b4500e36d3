"""GFNet's PPO agent: its returns, a PPO update, deterministic acting, save/load, seeding, and that it learns.

Tiny batches (8 images) on the shipped default task, except the learning test (64 images, ~20k steps, ~25 s).
"""

from __future__ import annotations

import math

import pytest
import torch

from agents import LearnedAgent, make_agent
from agents.gfnet_ppo import GFNetPPOAgent, discounted_returns, normalise
from gfenv.checkpoint import CheckpointError
from gfenv.env import DEFAULT_CHECKPOINT, GlanceFocusVectorEnv
from gfenv.eval.evaluation import evaluate

N = 8
MODES = ("continuous", "grid")


def agent(action: str = "continuous", seed: int = 0, **kwargs) -> GFNetPPOAgent:
    return make_agent("gfnet_ppo", env_kwargs={"action": action}, num_envs=N, seed=seed, **kwargs)


def eval_env(a: GFNetPPOAgent, num_envs: int = 4, **kwargs) -> GlanceFocusVectorEnv:
    return GlanceFocusVectorEnv(num_envs=num_envs, split="test", sampling="sequential", **a.env_kwargs, **kwargs)


def params(a: GFNetPPOAgent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in a.policy.named_parameters()}


def test_discounted_returns_gamma_07():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])  # (L=4, N=2)
    returns = discounted_returns(rewards, 0.7)
    torch.testing.assert_close(returns[:, 0], torch.tensor([1 + 0.7**3, 0.7**2, 0.7, 1.0]))
    torch.testing.assert_close(returns[:, 1], torch.tensor([1.4, 2.0, 0.0, 0.0]))
    z = normalise(returns)
    torch.testing.assert_close(z.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_hyperparameter_typo_is_refused_with_valid_names():
    with pytest.raises(ValueError, match=r"learning_rat.*learning_rate.*gamma.*action_std"):
        make_agent("gfnet_ppo", hyperparams={"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="state_encoder"):
        make_agent("gfnet_ppo", hyperparams={"state_encoder": "mlp"})


def test_env_kwargs_the_agent_owns_are_refused():
    with pytest.raises(ValueError, match="split"):
        make_agent("gfnet_ppo", env_kwargs={"split": "test"})
    with pytest.raises(ValueError, match="observation='gfnet'"):
        make_agent("gfnet_ppo", env_kwargs={"observation": "dict"})
    with pytest.raises(ValueError, match="action='continuous'"):
        make_agent("gfnet_ppo", env_kwargs={"action": "grid+stop"})


@pytest.mark.parametrize("action", MODES)
def test_one_update_trains_the_policy_but_not_the_std(action, tmp_path):
    a = agent(action, tensorboard_log=str(tmp_path / "tb"))
    assert isinstance(a, LearnedAgent)
    before = params(a)
    a.learn(1)
    assert a.num_timesteps == N * (a.env.steps - 1)
    after = params(a)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    if action == "continuous":
        assert a.policy.actor.std.item() == pytest.approx(0.1)
        assert all(p is not a.policy.actor.std for p in a.policy.parameters())
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("action", MODES)
def test_learn_counts_timesteps_in_whole_batches(action):
    a = agent(action)
    a.learn(300)
    per_batch = N * (a.env.steps - 1)
    assert a.num_timesteps == math.ceil(300 / per_batch) * per_batch
    assert all(torch.isfinite(p).all() for p in a.policy.parameters())


def test_a_callback_that_evaluates_mid_batch_on_other_envs_leaves_training_intact():
    class EvaluateEveryStep:
        calls = 0

        def on_step(self, agent, num_timesteps):
            self.calls += 1
            evaluate({"me": agent}, {}, episodes=5, seed=0, num_envs=5, progress=False)  # 5 slots, not N
            return True

    a, cb = agent(), EvaluateEveryStep()
    a.learn(N * (a.env.steps - 1) * 2, callbacks=[cb])
    assert cb.calls == 2 * (a.env.steps - 1) and a.num_timesteps == 2 * N * (a.env.steps - 1)
    assert all(torch.isfinite(p).all() for p in a.policy.parameters())


def test_callback_returning_false_stops_before_the_update():
    class StopAtOnce:
        calls = 0

        def on_step(self, agent, num_timesteps):
            self.calls += 1
            return False

    a, cb = agent(), StopAtOnce()
    before = params(a)
    a.learn(10_000, callbacks=[cb])
    assert cb.calls == 1 and a.num_timesteps == N
    assert all(torch.equal(before[k], v) for k, v in params(a).items())


@pytest.mark.parametrize("action", MODES)
def test_act_is_deterministic_in_range_and_never_revisits(action):
    a = agent(action, seed=1)
    env = eval_env(a)
    obs, _ = env.reset(seed=0)
    a.reset(env)
    first = a.act(obs, env)
    a.reset(env)
    assert torch.equal(first, a.act(obs, env))
    a.reset(env)
    seen = []
    for _ in range(env.steps - 1):
        actions = a.act(obs, env)
        if action == "continuous":
            assert actions.shape == (4, 2) and actions.dtype == torch.float32
            assert bool(((actions >= -1) & (actions <= 1)).all())
        else:
            assert actions.shape == (4,) and actions.dtype == torch.long
            assert not env.visited.gather(1, actions[:, None]).any()
            seen.append(actions)
        obs, *_ = env.step(actions)
    if seen:
        assert (torch.stack(seen).sort(0).values.diff(dim=0) > 0).all()


def test_gru_state_restarts_with_each_autoreset_episode():
    a = agent(seed=2)
    env = eval_env(a)  # NEXT_STEP autoreset: the step after the last one starts new episodes
    obs, _ = env.reset(seed=0)
    for _ in range(env.steps):
        obs, *_ = env.step(a.act(obs, env))
    assert bool((env.t == 1).all())
    fresh = make_agent("gfnet_ppo", env_kwargs={"action": "continuous"}, num_envs=N, seed=2)
    fresh.reset(env)
    assert torch.equal(a.act(obs, env), fresh.act(obs, env))


@pytest.mark.parametrize("action", MODES)
def test_save_load_round_trip_acts_the_same(action, tmp_path):
    a = agent(action)
    a.learn(1)
    a.save(tmp_path / "agent.pt")
    b = GFNetPPOAgent.load(tmp_path / "agent.pt")
    assert b._env is None, "loading for evaluation must not build a training env"
    assert b.num_timesteps == a.num_timesteps and b.env_kwargs == a.env_kwargs
    assert b.macs_per_step == a.macs_per_step > 0
    env = eval_env(a)
    obs, _ = env.reset(seed=0)
    a.reset(env)
    b.reset(env)
    for _ in range(env.steps - 1):
        actions = a.act(obs, env)
        assert torch.equal(actions, b.act(obs, env))
        obs, *_ = env.step(actions)
    b2 = GFNetPPOAgent.load(tmp_path / "agent.pt", num_envs=4)
    b2.learn(1)
    assert b2.num_timesteps == a.num_timesteps + 4 * (env.steps - 1)


def test_load_refuses_other_checkpoints():
    with pytest.raises(CheckpointError, match="not a gfnet_ppo checkpoint"):
        GFNetPPOAgent.load(DEFAULT_CHECKPOINT)


def test_same_seed_same_training():
    runs = [agent(seed=s) for s in (5, 5, 6)]
    for a in runs:
        a.learn(2 * N * 4)
    same, other = params(runs[1]), params(runs[2])
    for k, v in params(runs[0]).items():
        assert torch.equal(v, same[k]), k
    assert any(not torch.equal(v, other[k]) for k, v in params(runs[0]).items())


def test_evaluate_runs_the_agent_with_its_env_kwargs():
    a = agent("grid")
    result = evaluate({"gfnet_ppo": a}, {}, episodes=8, seed=0, num_envs=8, progress=False)["gfnet_ppo"]
    assert result["action"] == "grid"
    assert result["policy_macs_per_step"] == a.macs_per_step > 0
    assert len(result["accuracy"]) == 5


def test_learns_to_beat_random_locations():
    a = make_agent("gfnet_ppo", env_kwargs={"action": "continuous"}, num_envs=64, seed=0)
    a.learn(20_000)
    results = evaluate({"gfnet_ppo": a, "random": make_agent("random", seed=0)}, {}, episodes=200, seed=0,
                       progress=False)
    ppo, rnd = (results[k]["true_class_confidence"][-1] for k in ("gfnet_ppo", "random"))
    print(f"last-step true-class confidence: gfnet_ppo {ppo:.3f}, random {rnd:.3f}; accuracy: gfnet_ppo "
          f"{results['gfnet_ppo']['accuracy'][-1]:.1f} %, random {results['random']['accuracy'][-1]:.1f} %")
    assert ppo > rnd + 0.1
