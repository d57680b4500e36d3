"""The evaluation CLI and library: the JSON contract, determinism, same images for every agent, early stops.

Runs 20 test images per agent; the checks hold for any checkpoint (no accuracy thresholds).
"""

from __future__ import annotations

import json

import pytest
import torch

import evaluate_agent
from agents import Agent, make_agent
from gfenv.env import GlanceFocusVectorEnv
from gfenv.evaluation import evaluate, format_table

ARGS = ["--agents", "random,center,oracle", "--episodes", "20", "--num-envs", "8", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str]:
    path = tmp_path_factory.mktemp("eval") / "baselines.json"
    assert evaluate_agent.main([*ARGS, "--json", str(path)]) == 0
    return json.loads(path.read_text()), path.read_text()


def test_json_holds_the_contract_keys(report):
    data, _ = report
    assert data["env"] == "gfenv/GlanceFocus-v0" and data["episodes"] == 20 and data["seed"] == 3
    assert isinstance(data["env_kwargs"], dict) and list(data["agents"]) == ["random", "center", "oracle"]
    for result in data["agents"].values():
        steps = result["steps"]
        assert steps >= 2 and result["episodes"] == 20
        assert len(result["accuracy"]) == len(result["macs"]) == len(result["true_class_confidence"]) == steps
        assert all(0.0 <= a <= 100.0 for a in result["accuracy"])
        assert all(b > a for a, b in zip(result["macs"], result["macs"][1:]))
        assert all(0.0 <= c <= 1.0 for c in result["confidence"] + result["true_class_confidence"])


def test_same_seed_gives_identical_json(report, tmp_path):
    path = tmp_path / "again.json"
    assert evaluate_agent.main([*ARGS, "--json", str(path)]) == 0
    assert path.read_text() == report[1]


def test_oracle_is_at_least_as_confident_after_its_first_patch(report):
    agents = report[0]["agents"]
    oracle = agents["oracle"]["true_class_confidence"][1]
    assert oracle >= agents["random"]["true_class_confidence"][1] - 1e-6
    assert oracle >= agents["center"]["true_class_confidence"][1] - 1e-6
    assert agents["oracle"]["true_class_confidence"][0] == pytest.approx(agents["random"]["true_class_confidence"][0])


def test_batching_does_not_change_which_images_are_seen():
    one = evaluate({"center": make_agent("center")}, {"action": "grid"}, episodes=6, seed=0, num_envs=6,
                   progress=False)
    split = evaluate({"center": make_agent("center")}, {"action": "grid"}, episodes=6, seed=0, num_envs=4,
                     progress=False)
    for key in ("accuracy", "confidence", "true_class_confidence", "macs"):
        assert split["center"][key] == pytest.approx(one["center"][key], abs=1e-5)


class StopHalf(Agent):
    """Stops at once in even slots; odd slots take unvisited cells in order."""

    name = "stop-half"
    supported_actions = frozenset({"grid+stop"})
    macs_per_step = 1000

    def act(self, obs, env: GlanceFocusVectorEnv) -> torch.Tensor:
        cells = (~env.visited).float().argmax(1)
        even = torch.arange(env.num_envs, device=env.device) % 2 == 0
        return torch.where(even, env.grid ** 2, cells)


def test_early_stops_freeze_the_slot_and_count_policy_macs():
    env_kwargs = {"action": "grid+stop"}
    result = evaluate({"stop": StopHalf()}, env_kwargs, episodes=4, seed=0, num_envs=4, progress=False)["stop"]
    env = GlanceFocusVectorEnv(num_envs=1, action="grid+stop")
    steps = env.steps
    assert result["glimpses"] == pytest.approx([1 + k / 2 for k in range(steps)])
    expected = [env.glance_macs + k / 2 * env.focus_macs + (1 if k else 0) * 1000 / 2 + k / 2 * 1000
                for k in range(steps)]
    assert result["macs"] == pytest.approx(expected)


def test_agents_and_settings_are_checked_before_any_run():
    with pytest.raises(ValueError, match="action=grid\\+stop"):
        evaluate({"stop": StopHalf()}, {}, episodes=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="split"):
        evaluate({"center": make_agent("center")}, {"split": "train"}, episodes=2, seed=0, progress=False)


def test_cli_refuses_unknown_agents_and_env_ids(capsys):
    with pytest.raises(SystemExit):
        evaluate_agent.main(["--agents", "random,nope"])
    err = capsys.readouterr().err
    assert "'nope'" in err and "oracle" in err and "center" in err
    with pytest.raises(SystemExit):
        evaluate_agent.main(["--env", "gfenv/Nope-v0"])
    assert "gfenv/GlanceFocus-v0" in capsys.readouterr().err


def test_table_has_agent_rows_and_a_macs_row(report):
    table = format_table(report[0]["agents"])
    lines = table.splitlines()
    assert any(line.startswith("oracle") for line in lines) and any(line.startswith("MACs (M)") for line in lines)
    assert "t=1" in table
