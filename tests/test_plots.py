"""The benchmark's figures are real PNG files: anytime accuracy vs MACs, budgeted curves, and the patch pictures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import pytest

from agents import make_agent
from gfenv.eval.evaluation import render_episodes
from gfenv.eval.plots import plot_anytime, plot_budgeted, plot_patches

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def fake_results() -> dict[str, dict]:
    curve = [{"p": i / 20, "macs": 4e6 + i * 1e5, "accuracy": 50 + i} for i in range(1, 40)]
    return {"random": {"accuracy": [50, 60, 70], "accuracy_std": [0, 2, 3], "macs": [4e6, 8e6, 12e6],
                       "budgeted": curve},
            "stopper": {"accuracy": [50, 80, 85], "macs": [4e6, 8.5e6, 13e6], "budgeted": curve,
                        "learned_stop": {"macs": 7e6, "accuracy": 82}}}


def test_anytime_and_budgeted_plots_are_pngs_with_the_static_point(tmp_path):
    static = {"accuracy": 90.0, "macs": 30e6}
    assert_png(plot_anytime(fake_results(), tmp_path / "a" / "anytime.png", static))
    assert_png(plot_budgeted(fake_results(), tmp_path / "budgeted.png", static))
    assert_png(plot_budgeted(fake_results(), tmp_path / "no_static.png"))


def test_patch_pictures_draw_each_agent_on_the_same_images(tmp_path):
    pictures = {name: render_episodes(make_agent(name, seed=0), {"action": "grid"}, 3, seed=0)
                for name in ("center", "oracle")}
    assert pictures["center"]["labels"] == pictures["oracle"]["labels"]
    assert len(pictures["oracle"]["frames"]) == 3 and pictures["oracle"]["frames"][0].shape[2] == 3
    assert (pictures["center"]["frames"][0] != pictures["oracle"]["frames"][0]).any()
    assert_png(plot_patches(pictures, tmp_path / "patches.png", title="test"))


def test_patch_pictures_need_agents(tmp_path):
    with pytest.raises(ValueError, match="No agents"):
        plot_patches({}, tmp_path / "x.png")
