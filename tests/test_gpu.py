"""GPU checks (skipped without CUDA): a sync-free env step, and the training paths on the device.

Run them with ``python -m pytest -m gpu`` on a machine with a GPU (benchmarks/gpu_checks.sh runs them all).
"""

from __future__ import annotations

import pytest
import torch

from gfenv.env import GlanceFocusVectorEnv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _actions(env, gen):
    if env.action_mode == "continuous":
        return torch.rand(env.num_envs, 2, generator=gen, device="cuda") * 2 - 1
    return torch.randint(env.single_action_space.n, (env.num_envs,), generator=gen, device="cuda")


@pytest.mark.parametrize("action,autoreset,cache", [
    ("continuous", "NextStep", None), ("continuous", "SameStep", None), ("grid", "NextStep", None),
    ("grid", "SameStep", "memory"), ("grid+stop", "NextStep", None), ("grid+stop", "SameStep", "memory")])
def test_env_step_makes_no_device_to_host_sync(action, autoreset, cache):
    env = GlanceFocusVectorEnv(num_envs=64, action=action, autoreset_mode=autoreset, device="cuda", seed=0,
                               cache=cache, cache_images=128 if cache else None)
    gen = torch.Generator(device="cuda").manual_seed(0)
    actions = [_actions(env, gen) for _ in range(3 * env.steps)]
    env.reset(seed=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in actions:  # several episodes, through the autoresets
            obs, reward, terminated, truncated, info = env.step(a)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert reward.device.type == "cuda" and torch.isfinite(reward).all()


def test_cuda_and_cpu_envs_agree_on_the_same_images():
    kw = dict(num_envs=16, action="grid", sampling="sequential", split="test", autoreset_mode="Disabled")
    cpu, gpu = GlanceFocusVectorEnv(**kw), GlanceFocusVectorEnv(device="cuda", **kw)
    cpu.reset(seed=0), gpu.reset(seed=0)
    torch.testing.assert_close(cpu.images, gpu.images.cpu(), atol=1e-6, rtol=0)  # the same procedural images
    a = torch.arange(16) % 49
    r1, r2 = cpu.step(a)[1], gpu.step(a.cuda())[1]
    torch.testing.assert_close(r1, r2.cpu(), atol=1e-4, rtol=0)


def test_stage1_trains_on_cuda_with_every_memory_option(tmp_path):
    from gfenv.checkpoint import load_model
    from gfenv.train.stage1 import Stage1Config, train_stage1

    cfg = Stage1Config(device="cuda", epochs=0.01, batch_size=64, amp="bf16", grad_checkpointing=True,
                       accum_steps=2, channels_last=True)
    path = train_stage1(cfg, tmp_path, progress=False)
    model, _ = load_model(path, map_location="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ppo_learns_a_few_steps_on_cuda():
    from agents.sb3_agents import build_sb3_agent

    agent = build_sb3_agent("ppo", {"action": "grid"}, num_envs=16, device="cuda",
                            hyperparams={"n_steps": 8, "batch_size": 64, "n_epochs": 1})
    agent.learn(256)
    assert agent.num_timesteps >= 256


def stage3_memory_options_update(device: str) -> None:
    """One stage-3 update with bf16 autocast, activation checkpointing, 2 micro-batches and channels_last."""
    from agents import make_agent
    from gfenv.train.stage3 import Stage3Config, Stage3Wrapper

    env = GlanceFocusVectorEnv(num_envs=32, sampling="sequential", seed=0, device=device, action="grid")
    before = [p.detach().clone() for p in env.model.parameters()]
    cfg = Stage3Config(update_every=32, batch_size=32, train_focus=True, amp="bf16", grad_checkpointing=True,
                       accum_steps=2, channels_last=True)
    wrapper = Stage3Wrapper(env, cfg)
    agent = make_agent("random", seed=0)
    obs, _ = wrapper.reset(seed=0)
    agent.reset(wrapper)
    for _ in range(env.steps - 1):
        obs, *_ = wrapper.step(agent.act(obs, wrapper))
    assert wrapper.updates == 1 and all(torch.isfinite(torch.tensor(wrapper.losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, env.model.parameters()))


def static_reference_trains(device: str, tmp_path) -> None:
    from gfenv.train.static import StaticConfig, evaluate_static, train_static

    cfg = StaticConfig(device=device, max_iterations=3, batch_size=32, eval_images=64)
    path = train_static(cfg, tmp_path, progress=False)
    result = evaluate_static(path, {}, 64, device=device)
    assert 0.0 <= result["accuracy"] <= 100.0 and result["macs"] > 0


def test_stage3_memory_options_on_cuda():
    stage3_memory_options_update("cuda")


def test_static_reference_trains_on_cuda(tmp_path):
    static_reference_trains("cuda", tmp_path)


def test_classifier_first_step_matches_the_step_from_the_initial_state_on_cuda():
    """On CUDA the GRU cell is one fused kernel: ``first()`` equals it to float rounding (bit for bit on a CPU)."""
    from gfenv.models import RecurrentClassifier

    torch.manual_seed(0)
    model = RecurrentClassifier(feature_dim=128, num_classes=10).cuda()
    x = torch.randn(256, 128, device="cuda") * 3
    with torch.no_grad():
        plain, first = model.step(x, model.init_state(256, device="cuda"), 0), model.first(x)
    for a, b in zip(plain, first):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
