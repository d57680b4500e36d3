"""The batched environment: episodes, autoreset, seeding, rewards, render, and clear errors on bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import gfenv
from gfenv.checkpoint import CheckpointError
from gfenv.env import GlanceFocusVectorEnv
from gfenv.rewards import REWARDS


def make(num_envs=4, **kw):
    return gym.make_vec("gfenv/GlanceFocus-v0", num_envs=num_envs, **kw)


def rollout(env, actions):
    obs, info = env.reset(seed=3)
    out = [obs["glance"].clone()]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out += [obs["focus"].clone(), obs["memory"].clone(), r.clone()]
    return out


def test_make_vec_is_batched_env_and_256_slots_step():
    env = make(256)
    assert isinstance(env, GlanceFocusVectorEnv)
    obs, info = env.reset(seed=0)
    assert obs["glance"].shape == (256, int(np.prod(env.glance_map_shape)))
    for _ in range(env.steps - 1):
        obs, r, term, trunc, info = env.step(torch.zeros(256, 2))
    assert r.shape == (256,) and term.all() and not trunc.any()
    assert (info["glimpses"] == env.steps).all()


def test_episode_length_infos_and_next_step_autoreset():
    env = make(3)
    obs, info = env.reset(seed=0)
    assert info["glimpses"].tolist() == [1, 1, 1] and torch.all(info["macs"] == env.glance_macs)
    for k in range(env.steps - 1):
        obs, r, term, trunc, info = env.step(torch.zeros(3, 2))
        assert term.all() == (k == env.steps - 2)
    assert set(info) >= {"prediction", "correct", "confidence", "macs"}
    assert torch.equal(info["correct"], info["prediction"] == env.labels)
    expected = env.glance_macs + (env.steps - 1) * env.focus_macs
    assert torch.all(info["macs"] == expected)
    first_labels = env.labels.clone()
    obs, r, term, trunc, info = env.step(torch.zeros(3, 2))  # NEXT_STEP: this step resets, ignores the action
    assert torch.all(r == 0) and not term.any() and info["glimpses"].tolist() == [1, 1, 1]
    assert obs["step"][:, 0].tolist() == pytest.approx([1 / env.steps] * 3)
    assert not torch.equal(first_labels, env.labels) or True


def test_same_seed_same_episodes_bit_for_bit():
    actions = [torch.rand(4, 2, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(4)]
    a = rollout(make(4), actions)
    b = rollout(make(4), actions)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = make(4)
    c.reset(seed=4)
    assert not torch.equal(c.glance_map, make(4).reset(seed=3)[0]["glance"].reshape(c.glance_map.shape))


def test_grid_mode_masks_visited_cells():
    env = make(2, action="grid")
    env.reset(seed=0)
    env.step(torch.tensor([0, 48]))
    masks = env.action_masks()
    assert masks.shape == (2, 49) and not masks[0, 0] and not masks[1, 48] and masks[0, 48]


def test_grid_stop_ends_episode_early_and_resets_next_step():
    env = make(2, action="grid+stop")
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step(torch.tensor([49, 3]))
    assert term.tolist() == [True, False] and r[0] == 0
    assert info["macs"][0] == env.glance_macs and info["macs"][1] == env.glance_macs + env.focus_macs
    obs, r, term, trunc, info = env.step(torch.tensor([5, 5]))
    assert info["glimpses"].tolist() == [1, 3] and r[0] == 0


def test_early_stops_leave_the_batches_the_source_returned_untouched():
    """A full reset keeps the source's batch as the env's images; restarting single slots after early stops must
    write into the env's own copy, never into that batch, and each slot must show its own new image."""
    from gfenv.data import make_source

    source = make_source("glyphs", "train")
    returned = []

    class Recording:
        num_classes, image_shape, device, finite_by_construction = 10, source.image_shape, source.device, True

        def __len__(self):
            return len(source)

        def get(self, idx):
            images, labels = source.get(idx)
            returned.append((images, images.clone()))
            return images, labels

    env = GlanceFocusVectorEnv(num_envs=3, action="grid+stop", source=Recording(), seed=0)
    env.reset(seed=0)
    for a in ([49, 3, 49], [5, 49, 49], [7, 8, 9]):
        env.step(torch.tensor(a))
        for k in range(3):
            assert torch.equal(env.images[k], source.get(env.index[k:k + 1])[0][0])
    assert len(returned) > 2
    assert all(torch.equal(batch, copy) for batch, copy in returned)


@pytest.mark.parametrize("action,masked", [("grid", False), ("grid+stop", False), ("grid+stop", True)])
@pytest.mark.parametrize("observation", ["dict", "gfnet"])
def test_returned_observations_and_infos_never_change_later(action, masked, observation):
    """Observations are the env's state tensors themselves (not copies): the env must never write into what it
    returned, through steps, full resets and partial resets (by rows on a CPU, by masks as on CUDA)."""
    env = GlanceFocusVectorEnv(num_envs=3, action=action, observation=observation, autoreset_mode="SameStep", seed=0)
    env._masked_resets = masked
    kept = []

    def keep(*returned):
        flat = [x for r in returned for x in (r.values() if isinstance(r, dict) else [r])
                if isinstance(x, torch.Tensor)]
        kept.extend((x, x.clone()) for x in flat)

    keep(*env.reset(seed=0))
    stop = env.grid ** 2 if action == "grid+stop" else 0
    for a in ([stop, 3, 4], [5, stop, 6], [7, 8, stop], [9, 10, 11], [12, 13, 14], [1, 2, 3]):
        obs, reward, term, trunc, info = env.step(torch.tensor(a))
        keep(obs, reward, term, info, *[info[k] for k in ("final_obs", "final_info") if k in info])
        if "final_obs" in info and term.any():  # the episode's last observation, not the new episode's first
            last, first = (o if observation == "gfnet" else o["glance"] for o in (info["final_obs"], obs))
            assert not torch.equal(last[term], first[term])
    assert len(kept) > 50
    assert all(torch.equal(x, copy) for x, copy in kept)


def test_writing_into_returned_observations_does_not_change_the_episodes():
    """Observations are not all copies; a user writing into them must still not change rewards or predictions."""
    envs = [GlanceFocusVectorEnv(num_envs=3, action="grid+stop", autoreset_mode="SameStep", seed=0) for _ in range(2)]
    outs = []
    for scribble, env in zip((False, True), envs):
        obs, _ = env.reset(seed=0)
        out = []
        for a in ([49, 3, 4], [5, 49, 6], [7, 8, 49], [9, 10, 11], [12, 13, 14]):
            if scribble:
                for v in obs.values():
                    v.add_(100.0)
            obs, reward, term, trunc, info = env.step(torch.tensor(a))
            out += [reward, info["true_confidence"], info["prediction"]]
        outs.append(out)
    assert all(torch.equal(x, y) for x, y in zip(*outs))


@pytest.mark.parametrize("action,actions", [("grid", [[1, 2, 3]] * 4), ("grid+stop", [[49, 2, 3], [5, 49, 7]])])
def test_same_step_autoreset_marks_the_slots_whose_episode_ended(action, actions):
    """Gymnasium's SAME_STEP contract: info["_final_obs"] / ["_final_info"] say which slots' final_obs is real."""
    env = GlanceFocusVectorEnv(num_envs=3, action=action, autoreset_mode="SameStep", seed=0)
    env.reset(seed=0)
    for a in actions:
        obs, r, term, trunc, info = env.step(torch.tensor(a))
    assert term.any() and "final_obs" in info
    assert torch.equal(info["_final_obs"], term | trunc) and torch.equal(info["_final_info"], term | trunc)


def test_continuous_actions_outside_box_are_clipped():
    a, b = make(2), make(2)
    a.reset(seed=1)
    b.reset(seed=1)
    ra = a.step(torch.tensor([[5.0, -7.0], [2.0, 2.0]]))[1]
    rb = b.step(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))[1]
    assert torch.equal(ra, rb)
    assert a.history[:, 0].tolist() == [[96, 0], [96, 96]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_action_is_refused(bad):
    env = make(2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step(torch.tensor([[0.0, bad], [0.0, 0.0]]))


@pytest.mark.parametrize("bad", [49, -1])
def test_grid_action_out_of_range_is_refused(bad):
    env = make(2, action="grid")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="out of range"):
        env.step(np.array([0, bad]))


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_each_registered_reward_gives_one_finite_value_per_env(name):
    env = make(3, reward=name)
    env.reset(seed=0)
    for _ in range(env.steps - 1):
        r = env.step(torch.zeros(3, 2))[1]
        assert r.shape == (3,) and torch.isfinite(r).all()


def test_confidence_gain_is_change_of_true_class_probability():
    env = make(3)
    env.reset(seed=0)
    before = env.probs.gather(1, env.labels[:, None]).squeeze(1)
    r = env.step(torch.zeros(3, 2))[1]
    after = env.probs.gather(1, env.labels[:, None]).squeeze(1)
    assert torch.allclose(r, after - before)


def test_plugged_in_reward_and_mac_cost():
    def always_one(probs_before, probs_after, labels, step, macs):
        return torch.ones(labels.shape[0])

    env = make(2, reward=always_one, mac_cost=0.5)
    env.reset(seed=0)
    r = env.step(torch.zeros(2, 2))[1]
    assert torch.allclose(r, torch.full((2,), 1 - 0.5 * env.focus_macs / 1e6))


def test_reward_with_wrong_shape_or_nan_is_named():
    def wrong_shape(probs_before, probs_after, labels, step, macs):
        return torch.zeros(labels.shape[0], 2)

    def nan_reward(probs_before, probs_after, labels, step, macs):
        return torch.full((labels.shape[0],), float("nan"))

    for fn, pattern in ((wrong_shape, "wrong_shape.*shape"), (nan_reward, "nan_reward.*NaN")):
        env = make(2, reward=fn)
        env.reset(seed=0)
        with pytest.raises(ValueError, match=pattern):
            env.step(torch.zeros(2, 2))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="confidence_gain"):
        make(1, reward="nope")
    with pytest.raises(ValueError, match="glyphs"):
        make(1, dataset="nope")
    with pytest.raises(ValueError, match="continuous"):
        make(1, action="nope")
    with pytest.raises(ValueError, match="small_cnn"):
        from gfenv.backbones import build_encoder

        build_encoder("nope", 1)


def test_patch_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="larger than the image"):
        make(1, dataset_kwargs={"canvas": 24}, checkpoint="default")


def test_checkpoint_of_other_class_count_or_backbone_is_named():
    with pytest.raises(CheckpointError, match="num_classes=10.*100"):
        make(1, num_classes=100)
    with pytest.raises(CheckpointError, match="small_cnn.*resnet18"):
        make(1, backbone="resnet18")


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(gfenv.env.DEFAULT_CHECKPOINT.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="broken.pt"):
        make(1, checkpoint=str(bad))


def test_non_default_task_without_checkpoint_says_how_to_train_one():
    with pytest.raises(FileNotFoundError, match="train_agent.py --stage 1"):
        make(1, dataset_kwargs={"glyph_size": 12})


def test_labels_outside_class_range_are_refused(tensor_images):
    source = tensor_images(torch.rand(4, 1, 128, 128), torch.tensor([0, 1, 12, 3]), 10)
    with pytest.raises(ValueError, match="Label 12 is outside"):
        GlanceFocusVectorEnv(num_envs=4, source=source, sampling="sequential").reset(seed=0)


def test_nan_in_images_is_refused(tensor_images):
    images = torch.rand(2, 1, 128, 128)
    images[1, 0, 5, 5] = float("nan")
    source = tensor_images(images, torch.tensor([0, 1]), 10)
    with pytest.raises(ValueError, match="NaN"):
        GlanceFocusVectorEnv(num_envs=2, source=source).reset(seed=0)


def test_render_draws_numbered_patches():
    env = make(2, render_mode="rgb_array")
    env.reset(seed=0)
    plain = env.render()[0].copy()
    env.step(torch.zeros(2, 2))
    frame = env.render()[0]
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    assert (frame != plain).any()


def test_cascaded_classifier_runs_and_refuses_more_steps_than_heads():
    from gfenv.models import GFNetModel, ModelConfig

    model = GFNetModel(ModelConfig(classifier="cascaded", steps=3))
    env = GlanceFocusVectorEnv(num_envs=2, model=model, steps=3)
    obs, _ = env.reset(seed=0)
    assert obs["memory"].shape == (2, 3 * model.feature_dim)
    for _ in range(2):
        obs, r, term, _, _ = env.step(torch.zeros(2, 2))
    assert term.all() and torch.isfinite(r).all()
    with pytest.raises(ValueError, match="cascaded classifier has 3 heads"):
        GlanceFocusVectorEnv(num_envs=2, model=model, steps=4)


def test_single_env_matches_a_slot_of_the_vector_env():
    single = gym.make("gfenv/GlanceFocus-v0")
    vec = make(1)
    obs_s, _ = single.reset(seed=5)
    obs_v, _ = vec.reset(seed=5)
    assert np.array_equal(obs_s["glance"], obs_v["glance"][0].numpy())
    r_s = single.step(np.array([0.2, -0.4], dtype=np.float32))[1]
    r_v = vec.step(torch.tensor([[0.2, -0.4]]))[1]
    assert r_s == pytest.approx(float(r_v[0]))


def test_stepping_inside_inference_mode_then_outside_gives_the_same_episodes():
    actions = [torch.tensor([i % 49, (3 * i) % 49, 7, 0]) for i in range(9)]

    def run(env, inference_first: bool) -> list[torch.Tensor]:
        with torch.inference_mode(inference_first):  # e.g. an evaluation; the env's state must stay usable after it
            env.reset(seed=0)
            rewards = [env.step(a)[1] for a in actions[:3]]
            env.cell_confidences()
        env.reset(seed=1)  # training goes on outside inference mode
        return rewards + [env.step(a)[1] for a in actions[3:]]

    expected = run(GlanceFocusVectorEnv(num_envs=4, action="grid", seed=0), inference_first=False)
    got = run(GlanceFocusVectorEnv(num_envs=4, action="grid", seed=0), inference_first=True)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_disabled_autoreset_resets_the_masked_slots_only():
    env = make(4, action="grid+stop", autoreset_mode="Disabled")
    env.reset(seed=0)
    obs, r, term, _, info = env.step(torch.tensor([49, 49, 3, 4]))  # two slots stop
    assert term.tolist() == [True, True, False, False]
    images = env.images.clone()
    obs, info = env.reset(options={"reset_mask": term})
    assert info["glimpses"].tolist() == [1, 1, 2, 2] and obs["visited"][2:].sum() == 2
    assert torch.equal(env.images[2:], images[2:]) and not torch.equal(env.images[:2], images[:2])
    lockstep = make(2, action="grid", autoreset_mode="Disabled")
    lockstep.reset(seed=0)
    lockstep.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lockstep"):
        lockstep.reset(options={"reset_mask": np.array([True, False])})


def test_grid_actions_as_one_hot_rows_and_the_action_mask_info():
    rewards = []
    for as_one_hot in (False, True):
        env = make(3, action="grid+stop", seed=0)
        obs, info = env.reset(seed=0)
        assert info["action_mask"].shape == (3, 50) and info["action_mask"].all()
        cells = torch.tensor([5, 49, 17])
        a = torch.nn.functional.one_hot(cells, 50) if as_one_hot else cells
        obs, r, term, _, info = env.step(a)
        rewards.append(r)
        assert torch.equal(info["action_mask"], torch.as_tensor(env.action_masks()))
        assert not info["action_mask"][0, 5] and not info["action_mask"][2, 17] and info["action_mask"][:, 49].all()
    assert torch.equal(*rewards)
    with pytest.raises(ValueError, match="one-hot"):
        env.step(torch.ones(3, 50, dtype=torch.long))


def test_the_single_env_runs_on_one_thread_and_restores_torchs_setting():
    env = gym.make("gfenv/GlanceFocus-v0", action="grid")
    seen = []
    step = env.unwrapped.vec.step
    env.unwrapped.vec.step = lambda a: seen.append(torch.get_num_threads()) or step(a)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        env.reset(seed=0)
        env.step(3)
        assert seen == [1] and torch.get_num_threads() == 2
        assert isinstance(env.step(4)[4]["action_mask"], np.ndarray)
    finally:
        torch.set_num_threads(before)


def test_the_single_env_draws_its_images_ahead_without_changing_its_episodes():
    env = gym.make("gfenv/GlanceFocus-v0", action="grid")
    vec = env.unwrapped.vec
    gen = torch.Generator().manual_seed(11)
    expected = [int(torch.randint(len(vec.source), (1,), generator=gen)) for _ in range(40)]  # one draw per reset
    got = []
    env.reset(seed=11)
    for _ in range(40):
        got.append(int(vec.index[0]))
        assert torch.equal(vec.images, vec.source.get(vec.index)[0])
        env.reset()
    assert got == expected


def test_max_episode_steps_is_registered_and_steps_still_choose_the_length():
    assert gym.spec("gfenv/GlanceFocus-v0").max_episode_steps == 4
    assert make(2, steps=8).steps == 8  # make_vec passes the registered max_episode_steps=4: steps wins
    single = gym.make("gfenv/GlanceFocus-v0", steps=3)
    single.reset(seed=0)
    assert [single.step(np.zeros(2, np.float32))[2] for _ in range(2)] == [False, True]
    with pytest.raises(ValueError, match="max_episode_steps=6 disagrees"):
        make(2, max_episode_steps=6)
