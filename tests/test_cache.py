"""Cached-feature mode: exactly the observations, rewards and infos of live encoders, from a gather."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gfenv.cache import CachePlan, FeatureCache
from gfenv.data import make_source
from gfenv.env import GlanceFocusVectorEnv


@pytest.fixture(scope="module")
def glyphs40():
    images, labels = make_source("glyphs", "test").get(torch.arange(40))
    return images, labels


def _pair(tensor_images, glyphs40, **kw):
    source = tensor_images(*glyphs40, num_classes=10)
    live = GlanceFocusVectorEnv(num_envs=12, source=source, **kw)
    cached = GlanceFocusVectorEnv(num_envs=12, source=source, cache="memory", **kw)
    return live, cached


def _same(a, b, exact=True):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k], exact)
    elif exact or not a.is_floating_point():
        assert torch.equal(a, b), (a - b).abs().max() if a.is_floating_point() else "differ"
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("action,observation,autoreset", [("grid", "dict", "NextStep"), ("grid", "gfnet", "SameStep"),
                                                           ("grid+stop", "flat", "NextStep")])
def test_cached_mode_gives_exactly_the_live_observations_rewards_and_infos(tensor_images, glyphs40, action,
                                                                          observation, autoreset):
    live, cached = _pair(tensor_images, glyphs40, action=action, observation=observation, autoreset_mode=autoreset)
    # grid: bit for bit. grid+stop on a CPU resets early-stopped slots a few at a time, and the live glance encoder
    # on a batch of 1-3 images rounds differently (oneDNN picks other kernels) from the cache's batches: ~1e-6.
    exact = action == "grid"
    gen = torch.Generator().manual_seed(0)
    (o1, _), (o2, _) = live.reset(seed=5), cached.reset(seed=5)
    _same(o1, o2, exact)
    for _ in range(3 * live.steps):  # several episodes, through the autoresets
        a = torch.randint(live.single_action_space.n, (12,), generator=gen)
        s1, s2 = live.step(a), cached.step(a)
        for x, y in zip(s1, s2):
            if isinstance(x, dict):  # infos: compare the tensors (final_obs and final_info included)
                assert x.keys() == y.keys()
                _same({k: v for k, v in x.items() if k != "final_info"},
                      {k: v for k, v in y.items() if k != "final_info"}, exact)
            else:
                _same(x, y, exact)
    _same(live.cell_confidences(), cached.cell_confidences(), exact)


def test_cache_covers_the_first_images_of_the_split_and_draws_only_those():
    env = GlanceFocusVectorEnv(num_envs=8, action="grid", split="test", cache="memory", cache_images=16)
    env.reset(seed=0)
    seen = set()
    for _ in range(3 * env.steps):
        env.step(torch.zeros(8, dtype=torch.long))
        seen |= set(env.index.tolist())
    assert seen <= set(range(16)) and len(seen) > 8
    _, labels = env.source.get(torch.arange(16))
    assert torch.equal(env.cache.tensors["labels"], labels)
    assert env.render_slot(0).shape == (128, 128, 3)  # the image comes from the source when cached


def test_disk_cache_is_written_once_and_reused(tmp_path, tensor_images, glyphs40):
    source = tensor_images(*glyphs40, num_classes=10)
    env1 = GlanceFocusVectorEnv(num_envs=4, source=source, action="grid", cache="disk", cache_dir=tmp_path)
    files = sorted(p.name for p in env1.cache.path.iterdir())
    assert files == ["cell_features.npy", "complete.json", "glance_features.npy", "glance_maps.npy", "labels.npy"]
    stamp = (env1.cache.path / "cell_features.npy").stat().st_mtime_ns
    env2 = GlanceFocusVectorEnv(num_envs=4, source=source, action="grid", cache="disk", cache_dir=tmp_path)
    assert env2.cache.path == env1.cache.path
    assert (env2.cache.path / "cell_features.npy").stat().st_mtime_ns == stamp
    mem = GlanceFocusVectorEnv(num_envs=4, source=source, action="grid", cache="memory")
    for k, v in mem.cache.tensors.items():
        assert torch.equal(env2.cache.tensors[k], v)


def test_disk_cache_is_built_apart_and_a_rival_complete_build_wins(tmp_path, tensor_images, glyphs40, monkeypatch):
    """Runs started together build in folders of their own; the first complete build is renamed into place, the
    others use it. A half-written cache (no complete.json) under the final name is rebuilt, never reused."""
    source = tensor_images(*glyphs40, num_classes=10)
    mem = GlanceFocusVectorEnv(num_envs=4, source=source, action="grid", cache="memory").cache.tensors
    rename = Path.rename

    def rival_finishes_first(self, target):
        shutil.copytree(self, target)  # another run renamed the same complete cache into place a moment before
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rival_finishes_first)
    env = GlanceFocusVectorEnv(num_envs=4, source=source, action="grid", cache="disk", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [env.cache.path.name]  # our own build folder is gone
    assert all(torch.equal(env.cache.tensors[k], v) for k, v in mem.items())
    monkeypatch.undo()
    (env.cache.path / "complete.json").unlink()  # as a build killed half-way by an earlier version leaves it
    np.save(env.cache.path / "cell_features.npy", np.zeros(3, dtype=np.float32))
    again = GlanceFocusVectorEnv(num_envs=4, source=source, action="grid", cache="disk", cache_dir=tmp_path)
    assert again.cache.path == env.cache.path and (again.cache.path / "complete.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [env.cache.path.name]
    assert all(torch.equal(again.cache.tensors[k], v) for k, v in mem.items())


def test_size_estimate_counts_every_array():
    plan = CachePlan(images=10, cells=49, feature_dim=128, map_shape=(128, 2, 2), with_cell_maps=False)
    assert plan.nbytes == 10 * 8 + 4 * (10 * 128 + 10 * 512 + 10 * 49 * 128)
    assert CachePlan(10, 49, 128, (128, 2, 2), True).nbytes == plan.nbytes + 4 * 10 * 49 * 512


@pytest.mark.parametrize("kwargs,match", [({"action": "continuous"}, "action='grid'"),
                                          ({"action": "grid", "reward": "vs_random"}, "random"),
                                          ({"action": "grid", "cache_images": 0}, "cache_images"),
                                          ({"action": "grid", "cache": "ram"}, "Unknown cache"),
                                          ({"action": "grid", "cache": "disk"}, "cache_dir")])
def test_bad_cache_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlanceFocusVectorEnv(num_envs=2, **{"cache": "memory", **kwargs})


def test_memory_cache_too_large_names_the_alternatives(monkeypatch, tensor_images, glyphs40):
    monkeypatch.setattr("gfenv.cache.available_memory_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match="cache='disk'"):
        GlanceFocusVectorEnv(num_envs=2, source=tensor_images(*glyphs40, num_classes=10), action="grid",
                             cache="memory")
    assert FeatureCache  # the public class


def test_stage2_trains_on_cached_features_through_the_cli(tmp_path):
    import yaml

    from gfenv.cli import train as train_agent
    from gfenv.train.runs import load_agent

    rc = train_agent.main(["--stage", "2", "--agent", "maskable_ppo", "--timesteps", "64", "--num-envs", "4",
                           "--run-dir", str(tmp_path), "--no-progress", "--eval-freq", "0", "--eval-episodes", "24",
                           "--checkpoint-freq", "0", "--env-kwargs", "cache=memory", "cache_images=16",
                           "--hyperparams", "n_steps=8", "batch_size=32", "n_epochs=1"])
    assert rc == 0
    # a training cache larger than the validation split: the evaluation caches just the images it reads
    rc = train_agent.main(["--stage", "2", "--agent", "maskable_ppo", "--timesteps", "64", "--num-envs", "4",
                           "--run-dir", str(tmp_path / "big"), "--no-progress", "--eval-freq", "0",
                           "--eval-episodes", "8", "--checkpoint-freq", "0", "--env-kwargs", "cache=memory",
                           "cache_images=48", "val_size=16", "--hyperparams", "n_steps=8", "batch_size=32",
                           "n_epochs=1"])
    assert rc == 0
    config = yaml.safe_load((tmp_path / "config.yml").read_text())
    assert config["env_kwargs"]["cache"] == "memory" and config["env_kwargs"]["cache_images"] == 16
    record = (tmp_path / "evaluations.jsonl").read_text().splitlines()[-1]
    assert '"episodes": 24' in record  # the validation cache holds the 24 evaluation images
    assert load_agent(tmp_path).env_kwargs["cache"] == "memory"
