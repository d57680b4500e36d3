"""The baseline agents: valid actions in every action mode, no revisits, the oracle's argmax, the registry.

Small envs on the shipped checkpoint; nothing here depends on how well that checkpoint classifies.
"""

from __future__ import annotations

import math

import pytest
import torch

from agents import AGENTS, Agent, RandomAgent, make_agent, register_agent
from gfenv.env import ACTION_MODES, GlanceFocusVectorEnv
from gfenv.glimpse import location_to_corner

BASELINES = ("random", "center", "raster", "oracle")
N = 4


@pytest.fixture(scope="module")
def envs() -> dict[str, GlanceFocusVectorEnv]:
    return {mode: GlanceFocusVectorEnv(num_envs=N, split="test", sampling="sequential", action=mode)
            for mode in ACTION_MODES}


def episode(agent: Agent, env: GlanceFocusVectorEnv, seed: int = 0) -> list[torch.Tensor]:
    obs, _ = env.reset(seed=seed)
    agent.reset(env)
    actions = []
    for _ in range(env.steps - 1):
        a = agent.act(obs, env)
        actions.append(a.clone())
        obs, *_ = env.step(a)
    return actions


@pytest.mark.parametrize("mode", ACTION_MODES)
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_actions_are_valid_and_never_revisit(envs, name, mode):
    env = envs[mode]
    actions = episode(make_agent(name, seed=1), env)
    for a in actions:
        assert a.device == env.device
        if mode == "continuous":
            assert a.shape == (N, 2) and a.dtype == torch.float32
            assert bool(((a >= -1) & (a <= 1)).all())
        else:
            assert a.shape == (N,) and a.dtype == torch.long
            assert bool(((a >= 0) & (a < env.grid ** 2)).all()), "baselines never take the stop action"
    if mode != "continuous":
        cells = torch.stack(actions, 1)
        assert all(len(set(row)) == env.steps - 1 for row in cells.tolist())
    if mode != "continuous" or name != "random":
        assert (env.visited.sum(1) == env.steps - 1).all()


def test_oracle_picks_the_best_unvisited_cell(envs):
    for mode in ("grid", "continuous"):
        env, oracle = envs[mode], make_agent("oracle")
        obs, _ = env.reset(seed=5)
        oracle.reset(env)
        for k in range(env.steps - 1):
            conf = env.cell_confidences().masked_fill(env.visited, float("-inf"))
            best = conf.max(1).values
            a = oracle.act(obs, env)
            obs, *_ = env.step(a)
            cells = a if mode == "grid" else None
            if cells is None:
                corners = env.history[:, k]
                cells = (corners[:, None, :] == env.corners[None]).all(2).float().argmax(1)
            assert torch.equal(conf.gather(1, cells[:, None]).squeeze(1), best)


def test_center_starts_at_the_image_centre_then_the_corners(envs):
    env = envs["continuous"]
    obs, _ = env.reset(seed=0)
    a = make_agent("center").act(obs, env)
    corner = location_to_corner((a + 1) / 2, env.height, env.width, env.patch_size)
    expected = [math.floor(0.5 * (env.height - env.patch_size)), math.floor(0.5 * (env.width - env.patch_size))]
    assert corner.tolist() == [expected] * N
    g = envs["grid"].grid
    cells = [c[0].item() for c in episode(make_agent("center"), envs["grid"])]
    assert cells == [(g // 2) * g + g // 2, 0, g - 1, (g - 1) * g][: len(cells)]


def test_raster_spreads_over_an_even_sub_grid_in_both_modes(envs):
    env = envs["grid"]
    g, side = env.grid, math.ceil(math.sqrt(env.steps - 1))
    rows = torch.linspace(0, g - 1, side).round().long().tolist()
    expected = [i * g + j for i in rows for j in rows][: env.steps - 1]
    assert [c[0].item() for c in episode(make_agent("raster"), env)] == expected
    cont = envs["continuous"]
    episode(make_agent("raster"), cont)
    assert torch.equal(cont.history[0], cont.corners[expected])


def test_random_is_deterministic_given_its_seed(envs):
    for mode in ("continuous", "grid"):
        first = episode(RandomAgent(seed=7), envs[mode])
        again = episode(RandomAgent(seed=7), envs[mode])
        other = episode(RandomAgent(seed=8), envs[mode])
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_unknown_agent_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown agent 'nope'") as err:
        make_agent("nope")
    assert all(name in str(err.value) for name in BASELINES)


def test_agent_refuses_an_action_mode_it_cannot_produce(envs):
    class GridOnly(Agent):
        name = "grid-only"
        supported_actions = frozenset({"grid"})

    with pytest.raises(ValueError, match="action='grid'"):
        GridOnly().reset(envs["continuous"])
    GridOnly().reset(envs["grid"])


def test_register_agent_adds_to_the_one_registry():
    @register_agent("test-fixed")
    class Fixed(Agent):
        name = "test-fixed"

    try:
        assert isinstance(make_agent("test-fixed", seed=3), Fixed) and make_agent("test-fixed").macs_per_step == 0
        with pytest.raises(ValueError, match="already registered"):
            register_agent("test-fixed")(RandomAgent)
    finally:
        AGENTS.pop("test-fixed")
