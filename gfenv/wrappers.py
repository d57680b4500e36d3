"""Vector wrappers for ``GlanceFocusVectorEnv``: the episode statistics any client can log.

``EpisodeStatistics`` is Gymnasium's ``RecordEpisodeStatistics`` for this env, on its torch tensors and in every
autoreset mode, with what a glimpse policy is judged by: the accuracy after each glimpse, the first glimpse after
which the prediction is right, and the multiply-adds an episode cost. ``to_sb3`` puts it under SB3's ``VecMonitor``
(so ``gfenv.sb3.EpisodeStatisticsCallback`` logs it to TensorBoard); Gymnasium's own statistics and normalisation
wrappers run on the env through ``numpy_view`` (Gymnasium's ``ArrayConversion``, torch -> numpy).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv, VectorWrapper
from gymnasium.vector.vector_env import AutoresetMode

EPISODE_KEYS = ("r", "l", "t", "correct", "first_correct", "macs", "correct_at")
"""The entries of ``info["episode"]``; ``correct_at`` is (N, T), the others (N,)."""


class EpisodeStatistics(VectorWrapper):
    """Per-episode statistics of a ``GlanceFocusVectorEnv`` (bare or wrapped), in any autoreset mode.

    At a step where some slots' episodes end, ``info["episode"]`` holds tensors on the env's device, valid where
    ``info["_episode"]`` is True (Gymnasium's layout, so its loggers and ``DictInfoToList`` read it):

    - ``r``, ``l``, ``t``: the return, the length in steps and the seconds since the episode began (Gymnasium's keys);
    - ``correct``: whether the final prediction is right; ``macs``: the episode's multiply-adds;
    - ``correct_at``: (N, T) bool, whether the prediction was right after glimpse k = 1..T (k = 1: the glance; an
      episode that stopped early keeps its last answer for the glimpses it did not take);
    - ``first_correct``: the first glimpse after which the prediction was right (1..T), 0 if it never was.

    ``summary()`` gives the means over the last ``buffer_length`` episodes, for any logger (TensorBoard's
    ``add_scalar``, SB3's ``logger.record``): ``return``, ``length``, ``accuracy``, ``accuracy_t1..T``,
    ``first_correct`` (over the episodes that were ever right), ``never_correct`` (their complement's share) and
    ``macs``. On a GPU the wrapper synchronises once per step (to know whether an episode ended).
    """

    def __init__(self, env: VectorEnv, buffer_length: int = 100):
        super().__init__(env)
        base = env.unwrapped
        self.steps = int(base.steps)
        self.device = base.device
        self.autoreset_mode = AutoresetMode(env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
        n, dev = self.num_envs, self.device
        self._return = torch.zeros(n, dtype=torch.float64, device=dev)
        self._length = torch.zeros(n, dtype=torch.long, device=dev)
        self._correct_at = torch.zeros(n, self.steps, dtype=torch.bool, device=dev)
        self._active = torch.zeros(n, dtype=torch.bool, device=dev)
        self._start = np.zeros(n)
        self.episodes: deque[dict[str, Any]] = deque(maxlen=buffer_length)
        """The last ``buffer_length`` finished episodes, one dict of plain numbers each (``correct_at``: a list)."""

    # -------------------------------------------------------------------------------------------------- the API
    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        mask = (options or {}).get("reset_mask")
        started = (torch.ones(self.num_envs, dtype=torch.bool, device=self.device) if mask is None
                   else torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask,
                                        dtype=torch.bool, device=self.device))
        self._start_episodes(started, info)
        return obs, info

    def step(self, actions: Any):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        reward = torch.as_tensor(reward, device=self.device)
        ended = torch.as_tensor(terminated, device=self.device) | torch.as_tensor(truncated, device=self.device)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            restarted = ~self._active  # this step reset them (reward 0, action ignored): a new episode's glance
            moved = self._active
        else:
            restarted = torch.zeros_like(ended)
            moved = self._active
        self._return = self._return + torch.where(moved, reward.double(), 0.0)
        self._length = self._length + moved.long()
        final_info = info.get("final_info", info) if self.autoreset_mode == AutoresetMode.SAME_STEP else info
        self._record(final_info, moved)
        ended = ended & moved
        if bool(ended.any()):
            info = {**info, "episode": self._finish(ended, final_info), "_episode": ended.clone()}
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            restarted = ended  # the env started their next episode within this step
        if bool(restarted.any()):
            self._start_episodes(restarted, info)
        return obs, reward, terminated, truncated, info

    def summary(self) -> dict[str, float]:
        """Means over the last ``buffer_length`` finished episodes (empty before the first one ends)."""
        if not self.episodes:
            return {}
        eps = list(self.episodes)
        out = {"return": float(np.mean([e["r"] for e in eps])), "length": float(np.mean([e["l"] for e in eps])),
               "accuracy": float(np.mean([e["correct"] for e in eps]))}
        correct_at = np.array([e["correct_at"] for e in eps], dtype=float)
        out.update({f"accuracy_t{k + 1}": float(v) for k, v in enumerate(correct_at.mean(0))})
        first = [e["first_correct"] for e in eps if e["first_correct"] > 0]
        if first:
            out["first_correct"] = float(np.mean(first))
        out["never_correct"] = 1.0 - len(first) / len(eps)
        out["macs"] = float(np.mean([e["macs"] for e in eps]))
        return out

    # ----------------------------------------------------------------------------------------------- internals
    def _start_episodes(self, started: torch.Tensor, info: dict[str, Any]) -> None:
        self._return = torch.where(started, 0.0, self._return)
        self._length = torch.where(started, 0, self._length)
        self._correct_at = self._correct_at & ~started[:, None]
        self._active = self._active | started
        self._record(info, started)
        self._start[started.cpu().numpy()] = time.perf_counter()

    def _record(self, info: dict[str, Any], rows: torch.Tensor) -> None:
        """Write each slot's correctness after its latest glimpse (``info["glimpses"]``) where ``rows``."""
        glimpse = torch.as_tensor(info["glimpses"], device=self.device).long().clamp(1, self.steps) - 1
        correct = torch.as_tensor(info["correct"], device=self.device).bool()
        hit = torch.nn.functional.one_hot(glimpse, self.steps).bool() & rows[:, None]
        self._correct_at = torch.where(hit, correct[:, None], self._correct_at)

    def _finish(self, ended: torch.Tensor, info: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The ended slots' statistics (valid where ``ended``), kept in ``episodes`` too."""
        glimpses = torch.as_tensor(info["glimpses"], device=self.device).long().clamp(1, self.steps)
        correct = torch.as_tensor(info["correct"], device=self.device).bool()
        k = torch.arange(self.steps, device=self.device)
        correct_at = torch.where(k[None, :] >= glimpses[:, None], correct[:, None], self._correct_at)
        first = torch.where(correct_at.any(1), correct_at.float().argmax(1) + 1, 0)
        now = time.perf_counter()
        episode = {"r": self._return.clone(), "l": self._length.clone(),
                   "t": torch.as_tensor(now - self._start, dtype=torch.float64, device=self.device),
                   "correct": correct, "first_correct": first,
                   "macs": torch.as_tensor(info["macs"], device=self.device).double(), "correct_at": correct_at}
        rows = ended.nonzero().squeeze(1).tolist()
        host = {key: value.cpu().tolist() for key, value in episode.items()}
        for i in rows:
            self.episodes.append({key: host[key][i] for key in EPISODE_KEYS})
        self._active = self._active & ~ended
        return episode


def numpy_view(env: VectorEnv) -> VectorEnv:
    """``env`` (a ``GlanceFocusVectorEnv``, bare or wrapped) seen through numpy, for Gymnasium's wrappers that keep
    numpy statistics (``RecordEpisodeStatistics``, ``NormalizeReward``, ``NormalizeObservation``, ``DictInfoToList``):
    Gymnasium's ``ArrayConversion(env, env_xp=torch, target_xp=numpy)``, which needs the ``array-api-compat``
    package (a gfenv dependency). Observations, rewards and infos come back as numpy arrays (views of the tensors on
    a CPU, copies from a GPU) and actions go in as tensors on the env's device."""
    from gymnasium.wrappers.vector import ArrayConversion

    return ArrayConversion(env, env_xp=torch, target_xp=np, env_device=env.unwrapped.device)
