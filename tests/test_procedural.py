"""The pointer tasks of gfenv.procedural: images as a pure function of the index, and the chain they draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gfenv.data import make_source
from gfenv.procedural import ChainSource


@pytest.mark.parametrize("name", ["pointer", "chain"])
def test_images_are_a_pure_function_of_the_index(name):
    src = make_source(name, "test")
    idx = torch.tensor([5, 0, 77, 5, 9999])
    x, y = src.get(idx)
    c, h, w = src.image_shape
    assert x.shape == (5, c, h, w) and x.dtype == torch.float32 and y.dtype == torch.long
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x[0], x[3]) and int(y[0]) == int(y[3])
    x2, y2 = src.get(idx[1:3])
    assert torch.equal(x2, x[1:3]) and torch.equal(y2, y[1:3])
    other = make_source(name, "train").get(idx)[0]
    assert not torch.equal(other, x)
    assert src.finite_by_construction


def test_registered_settings():
    pointer, chain = make_source("pointer"), make_source("chain")
    assert (pointer.image_shape, pointer.num_classes, pointer.levels) == ((1, 160, 160), 12, 1)
    assert (chain.image_shape, chain.num_classes, chain.levels) == ((1, 224, 224), 32, 2)
    labels = chain.get(torch.arange(4000))[1]
    counts = torch.bincount(labels, minlength=32)
    assert counts.min() > 60  # every class occurs (uniform: 125 each)


def _tile_pixels(image: torch.Tensor, tile: int, row: int, col: int) -> torch.Tensor:
    return image[0, row * tile:(row + 1) * tile, col * tile:(col + 1) * tile]


@pytest.mark.parametrize("kwargs", [{"tiles": 5, "levels": 1, "values": 3}, {"tiles": 7, "levels": 2, "values": 2},
                                    {"tiles": 7, "levels": 3, "values": 2, "glyph_size": 24}])
def test_the_chain_of_pointers(kwargs):
    """Without noise, read every image's tiles back: one key (plus) on the cross, per level one candidate in each
    quadrant's block, and following the textured nodes from the key gives the label's digits."""
    src = ChainSource("test", noise=0.0, min_contrast=1.0, **kwargs)
    images, labels = src.get(torch.arange(40))
    t, n, half = src.tile, src.tiles, (src.tiles - 1) // 2
    textures, shapes = src.textures, src.silhouettes
    for image, label in zip(images, labels, strict=True):
        objects = {}
        for r in range(n):
            for c in range(n):
                px = _tile_pixels(image, t, r, c)
                if px.max() > 0:
                    values = px[px > 0].unique()
                    objects[(r, c)] = "flat" if len(values) == 1 else "textured"
        assert len(objects) == 1 + 4 * src.levels
        cross = [rc for rc in objects if half in rc]
        assert len(cross) == 1 and objects[cross[0]] == "textured"  # the key
        quadrant = {rc: (rc[0] > half) * 2 + (rc[1] > half) for rc in objects if rc not in cross}
        for q in range(4):
            assert sum(1 for v in quadrant.values() if v == q) == src.levels
            assert sum(1 for rc, v in quadrant.items() if v == q and objects[rc] == "textured") <= src.levels
        digits, rest = [], int(label)
        rest, value = divmod(rest, src.values)
        for _ in range(src.levels):
            rest, d = divmod(rest, 4)
            digits.insert(0, d)
        # level k's textured node sits in the quadrant named by digit k (the key holds digit 0)
        textured = [rc for rc, q in quadrant.items() if objects[rc] == "textured"]
        assert sorted(quadrant[rc] for rc in textured) == sorted(digits)
    assert textures.shape[0] == 10 and shapes.shape[0] == 5


def test_decoys_and_nodes_have_the_same_mean():
    """Texture or flat fill: an object's mean brightness is the same (what keeps the glance blind to the chain)."""
    src = ChainSource("test", noise=0.0, min_contrast=1.0)
    table = src._glyph_table  # (11, 5, 4, 4, g, g)
    means = table.mean(dim=(-1, -2))  # (11, 5, 4, 4)
    assert torch.allclose(means, means[10:11].expand_as(means), atol=0.02)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="tiles"):
        ChainSource(tiles=6)
    with pytest.raises(ValueError, match="levels"):
        ChainSource(tiles=5, levels=5)
    with pytest.raises(ValueError, match="values"):
        ChainSource(values=7)


REGISTERED = {"gfenv/GlyphPointer-v0": ({"dataset": "pointer", "patch_size": 32, "steps": 4, "backbone": "small_cnn",
                                         "action": "grid", "grid": 5}, 12),
              "gfenv/GlyphChain-v0": ({"dataset": "chain", "patch_size": 32, "steps": 8, "backbone": "small_cnn",
                                       "action": "grid", "grid": 7}, 32)}


@pytest.mark.parametrize("env_id", REGISTERED)
def test_registered_tasks_load_their_shipped_encoders_with_the_documented_shapes(env_id):
    import gymnasium

    from gfenv.checkpoint import load_model
    from gfenv.task import ASSETS, TASKS

    words, classes = REGISTERED[env_id]
    spec = gymnasium.spec(env_id)
    assert spec.kwargs == words and spec.max_episode_steps == words["steps"] - 1
    model, meta = load_model(ASSETS / TASKS[env_id].checkpoint)
    assert meta["env"] == env_id and meta["task"]["dataset"] == words["dataset"]
    assert model.config.num_classes == classes and model.config.steps == words["steps"]
    env = gymnasium.make_vec(env_id, num_envs=3)
    g = words["grid"]
    assert env.single_action_space == gymnasium.spaces.Discrete(g * g)
    obs, info = env.reset(seed=0)
    assert obs["visited"].shape == (3, g * g) and info["action_mask"].shape == (3, g * g)
    for step in range(1, words["steps"]):
        obs, reward, terminated, truncated, info = env.step(np.array([step, g * g // 2 + step, g * g - step]))
        assert terminated.all() == (step == words["steps"] - 1)
        if step == 1:
            assert obs["visited"].sum(1).tolist() == [1, 1, 1] and obs["focus"].shape[0] == 3
    env.close()


@pytest.mark.parametrize("env_id", REGISTERED)
def test_registered_tasks_are_deterministic_in_the_seed(env_id):
    import gymnasium

    def rollout(seed):
        env = gymnasium.make_vec(env_id, num_envs=2, split="test")
        obs, _ = env.reset(seed=seed)
        out = [obs["glance"].clone()]
        for action in ([1, 2], [3, 4]):
            obs, reward, *_ = env.step(torch.tensor(action))
            out += [obs["focus"].clone(), torch.as_tensor(reward).clone()]
        env.close()
        return out

    first, again, other = rollout(7), rollout(7), rollout(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
