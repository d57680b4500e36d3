"""Budgeted batch classification: MSDNet's threshold fitting on hand-made confidences, exits, and the 39-point curve."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gfenv.eval.budgeted import PS, budgeted_curve, exit_distribution, exit_steps, fit_thresholds

# 10 training images, 3 steps. Step 1: decreasing confidence. Step 2: the three most confident images are the ones
# that already exited at step 1, so a fit that forgot to drop them would pick 0.97 instead of 0.6.
CONF = torch.tensor([[0.90, 0.99, 1.0], [0.80, 0.98, 1.0], [0.70, 0.97, 1.0], [0.60, 0.50, 1.0], [0.50, 0.60, 1.0],
                     [0.40, 0.70, 1.0], [0.30, 0.80, 1.0], [0.20, 0.10, 1.0], [0.10, 0.20, 1.0], [0.05, 0.30, 1.0]])


def test_exit_distribution_is_p_to_the_k_normalised():
    q = exit_distribution(0.5, 3)
    assert q.tolist() == pytest.approx([0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875])
    assert exit_distribution(1.0, 4).tolist() == pytest.approx([0.25] * 4)
    assert len(PS) == 39 and PS[0] == 0.05 and PS[-1] == pytest.approx(1.95)


def test_thresholds_pick_the_floor_n_q_th_remaining_image():
    thresholds = fit_thresholds(CONF, [0.3, 0.3, 0.4])
    assert thresholds[:2].tolist() == pytest.approx([0.7, 0.6]) and thresholds[2] == -math.inf
    exits = exit_steps(CONF, thresholds)
    assert exits.tolist() == [0, 0, 0, 2, 1, 1, 1, 2, 2, 2]
    assert torch.bincount(exits, minlength=3).tolist() == [3, 3, 4]


def test_a_step_whose_share_rounds_to_no_image_lets_none_exit():
    thresholds = fit_thresholds(CONF, [0.05, 0.55, 0.4])  # floor(10 * 0.05) = 0
    assert thresholds[0] == math.inf
    assert thresholds[1] == pytest.approx(0.7)  # the 5th most confident at step 2 of all ten
    assert (exit_steps(CONF, thresholds) > 0).all()


def test_ties_exit_together():
    conf = torch.tensor([[0.8, 1.0], [0.8, 1.0], [0.8, 1.0], [0.1, 1.0]])
    thresholds = fit_thresholds(conf, [0.25, 0.75])
    assert thresholds[0] == pytest.approx(0.8) and exit_steps(conf, thresholds).tolist() == [0, 0, 0, 1]


def _synthetic(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence that grows over 5 steps; an image is right with probability equal to its confidence."""
    conf = (torch.rand(n, 1, generator=gen) + 0.3 * torch.rand(n, 5, generator=gen).cumsum(1)) / 2.6
    return conf, torch.rand(n, 5, generator=gen) < conf


def test_budgeted_curve_has_39_points_whose_cost_grows_with_p():
    gen = torch.Generator().manual_seed(0)
    train, _ = _synthetic(2000, gen)
    test, correct = _synthetic(1000, gen)
    macs = [1.0, 2.0, 3.0, 4.0, 5.0]
    curve = budgeted_curve(train, test, correct, macs)
    assert [p["p"] for p in curve] == pytest.approx(PS)
    costs = [p["macs"] for p in curve]
    assert all(b >= a for a, b in itertools.pairwise(costs)) and costs[-1] > costs[0]
    for point in curve:
        assert sum(point["exit_fractions"]) == pytest.approx(1.0)
        assert point["macs"] == pytest.approx(sum(f * m for f, m in zip(point["exit_fractions"], macs)))
        assert 0.0 <= point["accuracy"] <= 100.0 and len(point["thresholds"]) == 5


def test_budgeted_curve_on_its_own_train_set_exits_as_planned():
    conf = CONF[:, :2]
    correct = torch.tensor([[True, True]] * 5 + [[False, True]] * 5)
    (point,) = budgeted_curve(conf, conf, correct, [10.0, 30.0], ps=[1.0])  # q = (0.5, 0.5)
    assert point["exit_fractions"] == pytest.approx([0.5, 0.5])
    assert point["macs"] == pytest.approx(20.0) and point["accuracy"] == pytest.approx(100.0)


def test_per_image_costs_are_charged_at_each_image_s_exit():
    conf = CONF[:, :2]
    correct = torch.ones(10, 2, dtype=torch.bool)
    macs = torch.tensor([[10.0, 30.0]] * 5 + [[10.0, 20.0]] * 5)  # the first five exit at step 1, the rest at 2
    (point,) = budgeted_curve(conf, conf, correct, macs, ps=[1.0])
    assert point["macs"] == pytest.approx(15.0)


def test_bad_input_is_refused_with_the_shapes():
    with pytest.raises(ValueError, match="one per step"):
        fit_thresholds(CONF, [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        fit_thresholds(CONF, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        fit_thresholds(torch.full((3, 2), float("nan")), [0.5, 0.5])
    with pytest.raises(ValueError, match="Shapes disagree"):
        budgeted_curve(CONF, CONF[:, :2], torch.ones(10, 2, dtype=torch.bool), [1.0, 2.0])
    with pytest.raises(ValueError, match="macs_per_step"):
        budgeted_curve(CONF, CONF, torch.ones(10, 3, dtype=torch.bool), [1.0, 2.0])
