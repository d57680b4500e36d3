"""How fast the environment steps, side by side in one run: ``python -m gfenv.bench [--device cpu|cuda] --json PATH``.

Every figure is in env steps per second (one step = one slot's transition) on the default task with grid actions and
SAME_STEP autoreset (what SB3 sees: T - 1 = 4 transitions per episode, the reset inside the last one):

- ``batched``: ``GlanceFocusVectorEnv`` with live encoders, N slots stepped by one set of tensor ops;
- ``per_env``: SB3's ``DummyVecEnv`` over N single ``GlanceFocusEnv`` doing the same work one image at a time;
- ``floor``: the bare encoder and classifier forwards a live step cannot avoid, on the same batch shapes (per episode:
  one glance encoder + T - 1 focus encoder passes + T classifier steps), as equivalent env steps per second;
- ``cached``: the cached-feature mode (``cache="memory"``: a gather and the classifier step);
- ``sb3_ppo``: PPO's collect + train through the SB3 adapter (the project's ppo hyperparameters), env steps per second;
- ``sb3_ppo_collect``: PPO's collection alone (its ``collect_rollouts`` into the rollout buffer, no update): how fast
  SB3 and the adapter consume the env, policy forward included;
- ``sb3_ppo_tiny``: the same as ``sb3_ppo`` with a policy 8 wide throughout (``GlanceFocusExtractor`` channels and
  features, ``pi`` and ``vf`` layers): what SB3 and the adapter cost apart from the policy's own arithmetic;
- ``batched_stored`` (a diagnostic beside the issue's measures): ``batched`` with the same images stored in memory
  (``TensorSource``, uint8) instead of drawn procedurally at each reset, to tell the env's own cost from the default
  task's image synthesis; its ratio ``floor_over_batched_stored``;
- ``single``: one ``gymnasium.make`` env (what clients that vectorise through ``gym.make`` step each slot with);
- ratios ``batched_over_per_env``, ``floor_over_batched`` (step time / floor time), ``cached_over_batched``, and
  ``sb3_ppo_over_batched`` / ``sb3_ppo_tiny_over_batched`` (the share of the env's own rate PPO trains at),
  ``sb3_ppo_collect_over_batched`` (the share PPO collects at);
- ``imports``: ``import gfenv`` against ``import torch``, fresh interpreters in turn (``--imports`` rounds), the
  median of the rounds' ratios ``gfenv_over_torch``.

Timing: ``--cycles`` cycles; in each, every measure runs once to warm up, then the fast measures take turns run by
run for ``--repeats`` rounds, in reverse order every other round; then the slow ones (``per_env`` and the
``sb3_ppo`` measures) run max(2, repeats // 5) times, each run next to a ``batched`` run (before it, then after it, in
turn).
A figure is the median over cycles of its median run, and a ratio the median, over every cycle, of the ratios of
runs taken side by side (the two runs of a round; a ``per_env`` run and its ``batched`` neighbour), so that it
compares runs taken moments apart on a machine whose speed drifts. The thread count is printed. Like the project's
scripts, the command keeps freed heap memory for reuse (``gfenv.utils.keep_freed_memory``), and every measure runs
the frozen encoders the way the env does (``gfenv.models.encode``: BatchNorm folded, channels_last on a CPU).
``--memory`` (CUDA) adds the peak GPU memory of a stage-1 training step of GFNet's ImageNet setting (ResNet-50,
P = 96, T = 5, effective batch 256) under several memory settings.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.vector.vector_env import AutoresetMode

from gfenv.env import GlanceFocusEnv, GlanceFocusVectorEnv
from gfenv.glimpse import crop, glance
from gfenv.models import encode

KEYS = ("batched", "per_env", "floor", "cached", "sb3_ppo", "sb3_ppo_collect", "sb3_ppo_tiny", "batched_stored",
        "single", "imports")
SLOW = ("per_env", "sb3_ppo", "sb3_ppo_collect", "sb3_ppo_tiny")
"""Measures of seconds per run: timed after the fast rounds of every cycle, each run beside a run of its partner."""
PARTNERS = {"per_env": "batched", "sb3_ppo": "batched", "sb3_ppo_collect": "batched", "sb3_ppo_tiny": "batched"}
"""A slow measure's partner: a run of it is taken next to each of the slow measure's runs, for their ratio."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_cells(env: GlanceFocusVectorEnv, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=env.device).manual_seed(seed)
    return [torch.randint(env.grid * env.grid, (env.num_envs,), generator=gen, device=env.device)
            for _ in range(steps)]


@dataclass
class Workload:
    """One timed unit of work: ``run()`` does ``steps`` env steps (slot transitions)."""

    run: Callable[[], Any]
    steps: int


def vector_env_workload(env: GlanceFocusVectorEnv, episodes: int) -> Workload:
    """A batched env stepped with random grid actions for ``episodes`` episodes."""
    steps = episodes * (env.steps - 1)
    actions = _random_cells(env, steps, 0)
    env.reset(seed=0)

    def run():
        for a in actions:
            env.step(a)

    return Workload(run, env.num_envs * steps)


def profile_vector_env(env: GlanceFocusVectorEnv, episodes: int, rows: int = 15) -> str:
    """Where a batched step's time goes: torch.profiler's table of the ops of ``episodes`` episodes."""
    from torch.profiler import ProfilerActivity, profile

    actions = _random_cells(env, episodes * (env.steps - 1), 2)
    env.reset(seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for a in actions:
            env.step(a)
        _sync(env.device)
    key = "self_cuda_time_total" if env.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def per_env_workload(template: GlanceFocusVectorEnv, num_envs: int, episodes: int) -> Workload:
    """SB3's DummyVecEnv over ``num_envs`` single envs (sharing the model and the image source)."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    def make(i: int):
        return lambda: GlanceFocusEnv(model=template.model, source=template.source, action="grid", seed=i,
                                      device=template.device)

    venv = DummyVecEnv([make(i) for i in range(num_envs)])
    venv.seed(0)
    venv.reset()
    steps = episodes * (template.steps - 1)
    rng = np.random.default_rng(0)
    actions = [rng.integers(template.grid ** 2, size=num_envs) for _ in range(steps)]

    def run():
        for a in actions:
            venv.step(a)

    return Workload(run, num_envs * steps)


def floor_workload(env: GlanceFocusVectorEnv, episodes: int) -> Workload:
    """The encoder and classifier forwards of ``episodes`` episodes on pre-made inputs (no env around them)."""
    model, n, p = env.model, env.num_envs, env.patch_size
    images, _ = env.source.get(torch.arange(n, device=env.device) % len(env.source))
    glance_in = glance(images, p, model.config.glance_mode)
    cells = _random_cells(env, env.steps - 1, 1)
    patches = [crop(images, env.corners[c], p) for c in cells]

    @torch.no_grad()
    def run():
        for _ in range(episodes):
            feats, _ = encode(model.glance_encoder, glance_in)
            logits, memory = model.classifier.first(feats)  # the glance's step, as the env takes it
            logits.float().softmax(1)
            for t, x in enumerate(patches, start=1):
                feats, _ = encode(model.focus_encoder, x)
                logits, memory = model.classifier.step(feats, memory, t)
                logits.float().softmax(1)

    return Workload(run, episodes * (env.steps - 1) * n)


def stored_source(env: GlanceFocusVectorEnv, images: int):
    """The first ``images`` images of the env's source held in memory as uint8 (a ``TensorSource``)."""
    from gfenv.datasets import TensorSource

    x, y = env.source.get(torch.arange(images, device=env.device) % len(env.source))
    return TensorSource((x * 255).round().to(torch.uint8).cpu(), y.cpu(), env.source.num_classes,
                        device=env.device, name="stored images")


def sb3_ppo_agent(num_envs: int, device: str, width: int | None = None):
    """The bench's PPO agent: hyperparams/ppo.yml for the default task on ``num_envs`` slots; ``width``: one width
    for every layer of the policy (the extractor's and the ``pi`` / ``vf`` layers) in place of the yml's."""
    from agents.sb3_agents import build_sb3_agent
    from gfenv.train.stage2 import load_hyperparams

    hp = load_hyperparams("ppo")
    env_kwargs = hp.pop("env_kwargs", {})
    for key in ("n_envs", "n_timesteps"):
        hp.pop(key, None)
    if "batch_size" in hp and "n_steps" in hp:  # a rollout smaller than a mini-batch (tiny --num-envs)
        hp["batch_size"] = min(int(hp["batch_size"]), int(hp["n_steps"]) * num_envs)
    if width is not None:
        hp["policy_kwargs"] = (f"dict(net_arch=dict(pi=[{width}], vf=[{width}]), features_extractor_kwargs=dict("
                               f"features_dim={width}, conv_channels={width}, vector_dim={width}))")
    return build_sb3_agent("ppo", env_kwargs, num_envs=num_envs, seed=0, device=device, hyperparams=hp)


def sb3_ppo_workload(num_envs: int, device: str, rollouts: int, width: int | None = None,
                     collect_only: bool = False) -> Workload:
    """PPO collect + train (``sb3_ppo_agent``) through the SB3 adapter; ``collect_only``: its ``collect_rollouts``
    alone, as ``learn`` calls it, without the updates."""
    agent = sb3_ppo_agent(num_envs, device, width)
    model = agent.model
    per_rollout = num_envs * model.n_steps
    if not collect_only:
        return Workload(lambda: agent.learn(rollouts * per_rollout), rollouts * per_rollout)
    return Workload(sb3_collector(model, rollouts), rollouts * per_rollout)


def sb3_collector(model: Any, rollouts: int = 1) -> Callable[[], None]:
    """A call that fills ``model``'s rollout buffer ``rollouts`` times, as an on-policy SB3 ``learn`` does (its
    ``collect_rollouts``), without the updates; the env is reset once, here, as ``learn`` would."""
    _, callback = model._setup_learn(rollouts * model.env.num_envs * model.n_steps, None)
    callback.on_training_start(locals(), globals())

    def collect() -> None:
        for _ in range(rollouts):
            model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)

    return collect


def _time_run(w: Workload, device: torch.device) -> float:
    t0 = time.perf_counter()
    w.run()
    _sync(device)
    return time.perf_counter() - t0


def slow_runs(repeats: int) -> int:
    """Runs of each slow measure per cycle: max(2, repeats // 5)."""
    return max(2, repeats // 5)


def time_rounds(workloads: dict[str, Workload], repeats: int, cycles: int, device: torch.device,
                slow: tuple[str, ...] = SLOW, partners: dict[str, str] = PARTNERS) -> list[dict[str, list[float]]]:
    """Per cycle, the seconds of each timed run of each workload. Within a cycle every workload runs once to warm
    up, then the fast ones take turns run by run (``repeats`` rounds of one run each, in reverse order every other
    round), so that each ratio compares runs taken moments apart on a machine whose speed drifts by tens of percent
    within seconds. Then each ``slow`` one runs ``slow_runs(repeats)`` times, each run next to a run of its partner
    (``partners``; before it, then after it, in turn), recorded as ``"<partner>@<slow>"``: its ratio pairs those."""
    out = []
    for _ in range(cycles):
        for name in workloads:
            workloads[name].run()
            _sync(device)
        times: dict[str, list[float]] = {n: [] for n in workloads}
        fast = [n for n in workloads if n not in slow]
        for r in range(repeats):
            for name in fast if r % 2 == 0 else fast[::-1]:  # no measure always runs after the same one
                times[name].append(_time_run(workloads[name], device))
        for name in (n for n in workloads if n in slow):
            partner = partners.get(name) if partners.get(name) in workloads else None
            for k in range(slow_runs(repeats)):
                order = [name] if partner is None else [name, partner] if k % 2 == 0 else [partner, name]
                for which in order:
                    key = name if which == name else f"{partner}@{name}"
                    times.setdefault(key, []).append(_time_run(workloads[which], device))
        out.append(times)
    return out


def single_env_workload(template: GlanceFocusVectorEnv, episodes: int) -> Workload:
    """One ``gymnasium.make`` env of the default task (grid actions) for ``episodes`` episodes: what a client that
    vectorises through ``gym.make`` (rl-baselines3-zoo's DummyVecEnv, Gymnasium's SyncVectorEnv) steps each slot
    with."""
    import gymnasium as gym

    env = gym.make("gfenv/GlanceFocus-v0", action="grid", seed=0, device=template.device, model=template.model,
                   source=template.source)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    steps = episodes * (template.steps - 1)
    actions = rng.integers(template.grid ** 2, size=steps)

    def run():
        for k, a in enumerate(actions):
            if k % (template.steps - 1) == 0:
                env.reset()
            env.step(int(a))

    return Workload(run, steps)


def time_imports(rounds: int, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Seconds of a fresh interpreter that runs ``import torch``, and of one that runs ``import gfenv``, in turn
    (``rounds`` of each, the order reversed every other round); the ratio is the median of the rounds' ratios."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent.parent)
    times: dict[str, list[float]] = {"torch": [], "gfenv": []}
    for r in range(rounds):
        for module in (("torch", "gfenv") if r % 2 == 0 else ("gfenv", "torch")):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=root,
                           env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
            times[module].append(time.perf_counter() - t0)
    ratios = [g / t for g, t in zip(times["gfenv"], times["torch"])]
    out = {"seconds": times, "torch_s": statistics.median(times["torch"]), "gfenv_s": statistics.median(times["gfenv"]),
           "gfenv_over_torch": statistics.median(ratios), "ratios": ratios}
    log(f"  imports  torch {out['torch_s']:.2f} s, gfenv {out['gfenv_s']:.2f} s, gfenv / torch "
        f"{out['gfenv_over_torch']:.2f} ({rounds} rounds)")
    return out


def memory_settings() -> dict[str, dict[str, Any]]:
    """Stage-1 settings for the memory figure: (autocast dtype, activation checkpointing, micro-batches, NHWC)."""
    return {"fp32": {"amp": "none", "grad_checkpointing": False, "accum_steps": 1, "channels_last": False},
            "bf16": {"amp": "bf16", "grad_checkpointing": False, "accum_steps": 1, "channels_last": False},
            "bf16+ckpt": {"amp": "bf16", "grad_checkpointing": True, "accum_steps": 1, "channels_last": True},
            "low_memory": {"amp": "bf16", "grad_checkpointing": True, "accum_steps": 4, "channels_last": True}}


def bench_memory(device: torch.device, batch_size: int = 256, image_size: int = 224, patch_size: int = 96,
                 steps: int = 5, backbone: str = "resnet50", iterations: int = 2,
                 settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Peak GPU memory (GiB) of stage-1 training steps (forward, backward, SGD step) per memory setting."""
    from gfenv.models import GFNetModel, ModelConfig
    from gfenv.train.common import autocast_dtype
    from gfenv.train.stage1 import stage1_loss

    if device.type != "cuda":
        raise ValueError("--memory measures CUDA memory: run it with --device cuda.")
    out = {}
    for name, s in (settings or memory_settings()).items():
        torch.cuda.empty_cache()
        model = GFNetModel(ModelConfig(num_classes=1000, in_channels=3, patch_size=patch_size, steps=steps,
                                       backbone=backbone)).to(device)
        if s["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        gen = torch.Generator(device=device).manual_seed(0)
        images = torch.rand(batch_size, 3, image_size, image_size, device=device, generator=gen)
        if s["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(1000, (batch_size,), device=device, generator=gen)
        dtype = autocast_dtype(s["amp"], device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            for x, y in zip(images.chunk(s["accum_steps"]), labels.chunk(s["accum_steps"])):
                with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, _ = stage1_loss(model, x, y, gen, 1.0, s["grad_checkpointing"])
                (loss / s["accum_steps"]).backward()
            opt.step()
        torch.cuda.synchronize(device)
        out[name] = {**s, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                     "seconds_per_iteration": (time.perf_counter() - t0) / iterations}
        del model, opt, images, labels
    return {"backbone": backbone, "patch_size": patch_size, "steps": steps, "batch_size": batch_size,
            "image_size": image_size, "settings": out}


def run(device: str = "cpu", num_envs: int = 256, repeats: int = 15, episodes: int = 1, threads: int | None = None,
        cycles: int = 3, cache_images: int = 1024, skip: tuple[str, ...] = (), memory: bool = False,
        profile: bool = False, log: Callable[[str], Any] = print, import_rounds: int = 5,
        single_episodes: int = 32) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    report: dict[str, Any] = {"device": str(dev), "num_envs": num_envs, "threads": torch.get_num_threads(),
                              "repeats": repeats, "cycles": cycles, "torch": torch.__version__,
                              "machine": platform.processor() or platform.machine(),
                              "task": "gfenv/GlanceFocus-v0 default task, action=grid"}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
    log(f"gfenv.bench on {dev} ({report.get('gpu', report['machine'])}), {report['threads']} torch threads, "
        f"N = {num_envs}, {cycles} cycles of blocks of {repeats} timed runs")
    if "imports" not in skip and import_rounds > 0:
        report["imports"] = time_imports(import_rounds, log)
    env_kwargs = {"num_envs": num_envs, "action": "grid", "seed": 0, "device": dev,
                  "autoreset_mode": AutoresetMode.SAME_STEP}
    env = GlanceFocusVectorEnv(**env_kwargs)
    images = max(cache_images, num_envs)
    makers: dict[str, Callable[[], Workload]] = {
        "batched": lambda: vector_env_workload(env, episodes),
        "per_env": lambda: per_env_workload(env, num_envs, 1),
        "floor": lambda: floor_workload(env, episodes),
        "cached": lambda: vector_env_workload(GlanceFocusVectorEnv(
            **env_kwargs, cache="memory", cache_images=images, model=env.model), episodes * 4),
        "sb3_ppo": lambda: sb3_ppo_workload(num_envs, device, 1),
        "sb3_ppo_collect": lambda: sb3_ppo_workload(num_envs, device, 1, collect_only=True),
        "sb3_ppo_tiny": lambda: sb3_ppo_workload(num_envs, device, 1, width=8),
        "batched_stored": lambda: vector_env_workload(GlanceFocusVectorEnv(
            **env_kwargs, model=env.model, source=stored_source(env, images)), episodes),
        "single": lambda: single_env_workload(env, single_episodes),
    }
    workloads = {key: makers[key]() for key in makers if key not in skip}
    per_cycle = time_rounds(workloads, repeats, cycles, dev)
    details = report["details"] = {"seconds_per_run": per_cycle}
    for key, w in workloads.items():
        rates = [w.steps / statistics.median(cycle[key]) for cycle in per_cycle]
        report[key] = statistics.median(rates)
        details[key] = {"steps_per_s": rates, "steps_per_repeat": w.steps}
        log(f"  {key:<8} {report[key]:>12,.0f} steps/s")
    # each ratio: the median of the ratios of runs taken side by side, in the same round of the same cycle (a slow
    # measure's runs with the runs of its partner taken next to them), over every cycle
    ratios = {"batched_over_per_env": ("batched", "per_env"), "floor_over_batched": ("floor", "batched"),
              "cached_over_batched": ("cached", "batched"), "floor_over_batched_stored": ("floor", "batched_stored"),
              "sb3_ppo_over_batched": ("sb3_ppo", "batched"), "sb3_ppo_tiny_over_batched": ("sb3_ppo_tiny", "batched"),
              "sb3_ppo_collect_over_batched": ("sb3_ppo_collect", "batched")}
    for name, (x, y) in ratios.items():
        if x in workloads and y in workloads:
            sx, sy = workloads[x].steps, workloads[y].steps
            paired = []
            for cycle in per_cycle:
                xs = cycle[f"{x}@{y}"] if y in SLOW else cycle[x]
                ys = cycle[f"{y}@{x}"] if x in SLOW else cycle[y]
                paired += [(sx / tx) / (sy / ty) for tx, ty in zip(xs, ys, strict=True)]
            report[name] = statistics.median(paired)
            details[name] = paired
    if memory:
        report["memory"] = bench_memory(dev)
    if profile:
        report["profile"] = profile_vector_env(env, episodes)
        log(report["profile"])
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'measure':<26}{'value':>10}  unit"]
    for key in KEYS:
        if key in report and key != "imports":
            lines.append(f"{key:<26}{report[key]:>10,.0f}  env steps/s")
    if "imports" in report:
        imp = report["imports"]
        lines.append(f"{'import torch':<26}{imp['torch_s']:>10.2f}  s")
        lines.append(f"{'import gfenv':<26}{imp['gfenv_s']:>10.2f}  s")
        lines.append(f"{'import_gfenv_over_torch':<26}{imp['gfenv_over_torch']:>10.2f}  (target <= 1.3)")
    targets = {"batched_over_per_env": "target >= 30", "floor_over_batched": "target <= 1.25",
               "cached_over_batched": "target >= 20", "floor_over_batched_stored": "stored images; diagnostic",
               "sb3_ppo_over_batched": "share of the env's rate", "sb3_ppo_tiny_over_batched": "width 8; diagnostic",
               "sb3_ppo_collect_over_batched": "collection alone; diagnostic"}
    for key, target in targets.items():
        if key in report:
            lines.append(f"{key:<26}{report[key]:>10.2f}  ({target})")
    if "memory" in report:
        m = report["memory"]
        lines.append(f"stage-1 peak memory, {m['backbone']} P={m['patch_size']} T={m['steps']} "
                     f"batch {m['batch_size']} at {m['image_size']}px:")
        for name, s in m["settings"].items():
            lines.append(f"  {name:<20}{s['peak_gib']:>14.2f}  GiB  ({s['seconds_per_iteration']:.3f} s/iteration)")
    return "\n".join(lines)
