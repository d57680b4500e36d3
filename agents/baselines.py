"""Fixed reference policies: random, GFNet's centre-then-corners, a raster scan, and the label-peeking oracle.

Each works in every action mode and decides for all slots at once with tensor ops on the env's device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from agents.base import Agent, register_agent
from gfenv.env import GRID_MODES, GlanceFocusVectorEnv

CENTER_THEN_CORNERS = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))


def decision_index(env: GlanceFocusVectorEnv) -> torch.Tensor:
    """(N,) long: how many focus patches each slot has taken, i.e. the index of its next decision."""
    return (env.t - 1).clamp(0, env.steps - 2)


def patch_locations(cells: torch.Tensor, env: GlanceFocusVectorEnv) -> torch.Tensor:
    """(..., 2) locations in [0, 1]^2 whose patch is exactly grid cell ``cells`` under GFNet's floor mapping.

    The half-pixel offset keeps floor(loc * (H - P)) on the cell's corner despite float rounding.
    """
    span = torch.tensor([max(env.height - env.patch_size, 1), max(env.width - env.patch_size, 1)],
                        dtype=torch.float32, device=env.device)
    return ((env.corners[cells].float() + 0.5) / span).clamp(0.0, 1.0)


def to_continuous(locations: torch.Tensor) -> torch.Tensor:
    """GFNet locations in [0, 1]^2 as continuous actions in [-1, 1]^2."""
    return (2.0 * locations - 1.0).float()


def cells_to_actions(cells: torch.Tensor, env: GlanceFocusVectorEnv) -> torch.Tensor:
    """Cell indices as the env's actions: the indices themselves, or their locations in continuous mode."""
    if env.action_mode in GRID_MODES:
        return cells.long()
    return to_continuous(patch_locations(cells, env))


def cell_sequence(first: list[int], num_cells: int, device: torch.device) -> torch.Tensor:
    """``first`` without repeats, then every other cell in row-major order: a visiting order with no revisits."""
    order = list(dict.fromkeys(first))
    seen = set(order)
    order += [k for k in range(num_cells) if k not in seen]
    return torch.tensor(order, dtype=torch.long, device=device)


def unvisited_argmax(scores: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """(N,) the best-scoring cell not yet visited; a slot that has seen every cell may pick any."""
    blocked = visited & ~visited.all(1, keepdim=True)
    return scores.masked_fill(blocked, float("-inf")).argmax(1)


class SequenceAgent(Agent):
    """A fixed visiting order: a table of actions indexed by each slot's decision count."""

    def table(self, env: GlanceFocusVectorEnv) -> torch.Tensor:
        """(L, ...) actions for decisions 0..L-1; decisions past L repeat the last one."""
        raise NotImplementedError

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        table = self.table(env)
        return table[decision_index(env).clamp(max=len(table) - 1)]


@register_agent("random")
class RandomAgent(Agent):
    """Uniform locations in continuous mode; a uniformly drawn unvisited cell in the grid modes (never stops)."""

    name = "random"

    def __init__(self, seed: int | None = None):
        super().__init__(seed)
        self._gen: torch.Generator | None = None
        self._gen_device: torch.device | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The agent's random stream on ``device``, seeded by ``seed`` when first used there."""
        if self._gen is None or self._gen_device != device:
            self._gen, self._gen_device = torch.Generator(device=device), device
            if self.seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(int(self.seed))
        return self._gen

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        gen, n = self.generator(env.device), env.num_envs
        if env.action_mode not in GRID_MODES:
            return torch.rand(n, 2, generator=gen, device=env.device) * 2.0 - 1.0
        scores = torch.rand(n, env.grid * env.grid, generator=gen, device=env.device)
        return unvisited_argmax(scores, env.visited)


@register_agent("center")
class CenterAgent(SequenceAgent):
    """GFNet's fixed policy: the centre, then the corners (0, 0), (0, 1), (1, 0), (1, 1); then row-major cells.

    Continuous mode uses the exact locations; the grid modes the nearest cells, (G//2, G//2) and the corner cells.
    """

    name = "center"

    def table(self, env: GlanceFocusVectorEnv) -> torch.Tensor:
        g, mid, last = env.grid, env.grid // 2, env.grid - 1
        fixed = [mid * g + mid, 0, last, last * g, last * g + last]
        order = cell_sequence(fixed, g * g, env.device)
        if env.action_mode in GRID_MODES:
            return order
        rest = order[len(set(fixed)):]
        exact = torch.tensor(CENTER_THEN_CORNERS, dtype=torch.float32, device=env.device)
        return to_continuous(torch.cat([exact, patch_locations(rest, env)]))


@register_agent("raster")
class RasterAgent(SequenceAgent):
    """Row-major over an evenly spaced s x s sub-grid of cells, s = ceil(sqrt(T - 1)), so the patches spread out."""

    name = "raster"

    def table(self, env: GlanceFocusVectorEnv) -> torch.Tensor:
        g = env.grid
        side = math.ceil(math.sqrt(env.steps - 1))
        rows = torch.linspace(0, g - 1, side).round().long().tolist()
        order = cell_sequence([i * g + j for i in rows for j in rows], g * g, env.device)
        return cells_to_actions(order, env)


@register_agent("oracle")
class OracleAgent(Agent):
    """Each step the unvisited cell that maximises the true-class probability (privileged: it reads the labels)."""

    name = "oracle"

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        return cells_to_actions(unvisited_argmax(env.cell_confidences(), env.visited), env)
