"""The shipped stage-1 encoders make the default task what the README promises, on a fixed test batch."""

from __future__ import annotations

from agents import make_agent
from gfenv.checkpoint import load_model
from gfenv.env import DEFAULT_CHECKPOINT
from gfenv.eval.evaluation import evaluate

EPISODES = 500


def test_shipped_checkpoint_is_a_trained_stage1_model():
    model, meta = load_model(DEFAULT_CHECKPOINT)
    assert meta["stage"] == 1 and meta["dataset"] == "glyphs"
    assert model.config.num_classes == 10 and model.config.patch_size == 32 and model.config.steps == 5


def test_default_task_properties_on_the_first_500_test_images():
    agents = {name: make_agent(name, seed=0) for name in ("random", "oracle")}
    res = evaluate(agents, {}, episodes=EPISODES, seed=0, num_envs=250, progress=False)
    glance, oracle5 = res["oracle"]["accuracy"][0], res["oracle"]["accuracy"][-1]
    random5 = res["random"]["accuracy"][-1]
    assert 25.0 <= glance <= 70.0, glance
    assert oracle5 >= 95.0, oracle5
    assert random5 <= oracle5 - 25.0, (random5, oracle5)
    assert res["random"]["accuracy"][0] == glance  # both start from the same glance
