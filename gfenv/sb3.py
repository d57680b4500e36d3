"""Stable-Baselines3 adapter: ``to_sb3`` turns a ``GlanceFocusVectorEnv`` (bare or inside gymnasium vector
wrappers) into an SB3 ``VecEnv``.

Numpy at the boundary, SB3's same-step resets with ``terminal_observation``, and ``action_masks`` for MaskablePPO.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv, VectorWrapper
from gymnasium.vector.vector_env import AutoresetMode
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from gfenv.env import GRID_MODES, GlanceFocusVectorEnv
from gfenv.wrappers import EpisodeStatistics

INFO_KEYS = ("prediction", "confidence", "correct", "macs", "glimpses")
EPISODE_KEYS = ("correct", "macs")
"""What ``VecMonitor`` keeps of each episode beside its return, length and time (``info["episode"]``); with
``EpisodeStatistics`` in the chain also ``first_correct`` and ``correct_t1``..``correct_tT``."""
PER_SLOT_METHODS = ("action_masks", "cell_confidences")
SINGLE_SPACES = {"observation_space": "single_observation_space", "action_space": "single_action_space"}


def to_sb3(env: VectorEnv | None = None, *, monitor: bool = True, monitor_file: str | None = None,
           **make_kwargs: Any) -> VecEnv:
    """An SB3 ``VecEnv`` over ``env``, or over ``GlanceFocusVectorEnv(autoreset_mode=SAME_STEP, **make_kwargs)``.

    ``env`` is a ``GlanceFocusVectorEnv`` or a gymnasium ``VectorWrapper`` chain around one (``env.unwrapped``):
    SB3 steps the outermost wrapper, so its rewards, observations and spaces are the wrapper's (e.g.
    ``gymnasium.wrappers.vector.TransformReward`` or ``gfenv.train.stage3.Stage3Wrapper``), while attributes and methods
    such as ``action_masks``, ``cell_confidences`` or ``steps`` are looked up through the chain, outermost first.

    SB3 expects a finished slot to be reset within the same step, so the adapter needs an env (or outermost
    wrapper) that presents ``AutoresetMode.SAME_STEP``, fixed when it is built: ``GlanceFocusVectorEnv(...,
    autoreset_mode=AutoresetMode.SAME_STEP)``, or ``Stage3Wrapper(env, autoreset_mode=SAME_STEP)`` over an env built
    with autoreset disabled. Another mode is refused with what to build instead.

    An env that ``to_sb3`` builds comes inside ``gfenv.wrappers.EpisodeStatistics``. With ``monitor=True``
    (default) the adapter comes wrapped in ``VecMonitor`` (writing ``monitor_file``, ``<name>.monitor.csv``, when
    given), so each finished episode's info has ``info["episode"]`` = {"r", "l", "t", "correct", "macs"} and, with
    ``EpisodeStatistics`` in the chain, ``first_correct`` and ``correct_t1``..``correct_tT`` (right after glimpse
    k), as ``evaluate_policy`` and SB3's logger expect; ``EpisodeStatisticsCallback`` logs their means.
    ``has_attr``/``env_method`` (and so MaskablePPO's masks) pass through it.
    """
    if env is None:
        mode = make_kwargs.pop("autoreset_mode", AutoresetMode.SAME_STEP)
        if AutoresetMode(mode) != AutoresetMode.SAME_STEP:
            raise ValueError(f"autoreset_mode={mode!r}: the SB3 adapter needs AutoresetMode.SAME_STEP.")
        env = EpisodeStatistics(GlanceFocusVectorEnv(autoreset_mode=AutoresetMode.SAME_STEP, **make_kwargs))
    elif make_kwargs:
        raise TypeError(f"to_sb3() got an env and construction kwargs {sorted(make_kwargs)}; pass one or the other.")
    venv = SB3VecEnv(env)
    return VecMonitor(venv, filename=monitor_file, info_keywords=venv.episode_keys) if monitor else venv


def log_episode_statistics(model: Any) -> None:
    """Record the means of the episodes in ``model.ep_info_buffer`` (SB3's last 100) that SB3 itself does not:
    ``rollout/ep_correct_mean`` (accuracy at the end), ``rollout/ep_accuracy_t<k>`` (after glimpse k),
    ``rollout/ep_first_correct_mean`` (over the episodes ever right) and ``rollout/ep_macs_mean``."""
    episodes = list(model.ep_info_buffer or [])
    if not episodes:
        return
    for key, name in (("correct", "ep_correct_mean"), ("macs", "ep_macs_mean")):
        values = [float(e[key]) for e in episodes if key in e]
        if values:
            model.logger.record(f"rollout/{name}", float(np.mean(values)))
    steps = sorted(int(k[len("correct_t"):]) for k in episodes[-1] if k.startswith("correct_t"))
    for k in steps:
        model.logger.record(f"rollout/ep_accuracy_t{k}",
                            float(np.mean([float(e[f"correct_t{k}"]) for e in episodes if f"correct_t{k}" in e])))
    first = [int(e["first_correct"]) for e in episodes if int(e.get("first_correct", 0)) > 0]
    if first:
        model.logger.record("rollout/ep_first_correct_mean", float(np.mean(first)))


class EpisodeStatisticsCallback(BaseCallback):
    """Logs ``log_episode_statistics`` after each rollout, through SB3's logger (so to TensorBoard with
    ``tensorboard_log``); for an env from ``to_sb3`` (rl-baselines3-zoo: ``callback:
    gfenv.sb3.EpisodeStatisticsCallback``, which ``--gym-packages gfenv`` adds for gfenv ids)."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        log_episode_statistics(self.model)


class SB3VecEnv(VecEnv):
    """``GlanceFocusVectorEnv`` (bare or wrapped) seen through SB3's ``VecEnv`` API (use ``to_sb3`` to build one).

    Observations, rewards and dones are numpy; ``infos[i]`` holds the slot's ``prediction``, ``confidence``,
    ``correct``, ``macs`` and ``glimpses`` (at an episode's end those of the finished episode, with
    ``terminal_observation`` and ``TimeLimit.truncated``). ``env`` is what gets stepped (the outermost wrapper),
    ``base`` the ``GlanceFocusVectorEnv`` underneath. All slots share one env object: ``get_attr`` returns the
    attribute of the outermost layer that has it once per slot (``observation_space``/``action_space`` give the
    single-slot spaces), ``set_attr`` sets it on that layer (else on the outermost) for all slots at once,
    ``env_method`` calls the method once and hands each slot its row for ``action_masks``/``cell_confidences``,
    its own frame for ``render``, and the same result otherwise. The slots draw from one generator, so ``reset()``
    seeds the env with the first of the seeds that ``seed()`` stored.
    """

    def __init__(self, env: VectorEnv):
        base = env.unwrapped if isinstance(env, VectorEnv) else env
        if not isinstance(base, GlanceFocusVectorEnv):
            inside = "" if base is env else f" around {type(base).__name__}"
            raise TypeError(f"to_sb3() needs a GlanceFocusVectorEnv, bare or inside gymnasium VectorWrappers; got "
                            f"{type(env).__name__}{inside}. Build it with to_sb3(**kwargs) or pass the env (or a "
                            "vector wrapper around it).")
        mode = env.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"to_sb3(): {type(env).__name__} runs with autoreset_mode={mode!s}; SB3 resets a "
                             "finished slot within the same step, so build the env with "
                             "autoreset_mode=AutoresetMode.SAME_STEP (or wrap an env built with DISABLED in "
                             "Stage3Wrapper(env, autoreset_mode=SAME_STEP)).")
        self.env = env
        self.base = base
        self._statistics = any(isinstance(layer, EpisodeStatistics) for layer in self._layers())
        self.episode_keys = EPISODE_KEYS + (
            ("first_correct", *(f"correct_t{k}" for k in range(1, base.steps + 1))) if self._statistics else ())
        """The per-slot info keys of a finished episode that ``VecMonitor`` should keep (``info_keywords``)."""
        self._actions: Any = None
        self._needs_reset = True
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    # ------------------------------------------------------------------------------------------------ stepping
    def reset(self) -> VecEnvObs:
        options = self._options[0] or None
        obs, info = self.env.reset(seed=self._seeds[0], options=options)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = _split_info(info, self.num_envs)
        self._needs_reset = False
        return _to_numpy(obs)

    def step_async(self, actions: np.ndarray) -> None:
        if self._needs_reset:
            raise gym.error.ResetNeeded("Call reset() on the SB3 adapter before stepping it.")
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without a pending step_async().")
        actions, self._actions = self._actions, None
        obs, reward, terminated, truncated, info = self.env.step(actions)
        terminated, truncated = _to_numpy(terminated).astype(bool), _to_numpy(truncated).astype(bool)
        dones = terminated | truncated
        infos = _split_info(info, self.num_envs)
        if dones.any():
            if "final_obs" not in info:
                raise RuntimeError("An episode ended without final_obs: the env left AutoresetMode.SAME_STEP.")
            ended = np.flatnonzero(dones)
            final_obs = _to_numpy(info["final_obs"])
            final_infos = _split_info(info["final_info"], self.num_envs, ended)
            timeouts = (truncated & ~terminated)[ended].tolist()
            episode = info.get("episode") if self._statistics else None
            if episode is not None:
                first = _to_numpy(episode["first_correct"])[ended].astype(int).tolist()
                correct_at = _to_numpy(episode["correct_at"])[ended].astype(bool)
                step_keys = [f"correct_t{k + 1}" for k in range(correct_at.shape[1])]
                correct_at = correct_at.tolist()
            for j, i in enumerate(ended.tolist()):
                final = final_infos[j]
                final["terminal_observation"] = _row(final_obs, i)
                final["TimeLimit.truncated"] = timeouts[j]
                if episode is not None:
                    final["first_correct"] = first[j]
                    final.update(zip(step_keys, correct_at[j]))
                infos[i] = final
        return _to_numpy(obs), _to_numpy(reward).astype(np.float32), dones, infos

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------------------------- attributes, methods
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        self._check_masks(attr_name)
        name = SINGLE_SPACES.get(attr_name, attr_name)
        value = getattr(self._holder(name), name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if sorted(set(self._get_indices(indices))) != list(range(self.num_envs)):
            raise ValueError(f"set_attr({attr_name!r}) on a subset of slots: all slots share one "
                             "GlanceFocusVectorEnv, so an attribute can only be set for all of them.")
        setattr(self._holder(attr_name, missing_ok=True), attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        idx = list(self._get_indices(indices))
        if method_name == "render":
            return self._images(idx)
        self._check_masks(method_name)
        result = getattr(self._holder(method_name), method_name)(*method_args, **method_kwargs)
        if method_name in PER_SLOT_METHODS:
            rows = _to_numpy(result)
            return [rows[i] for i in idx]
        return [result for _ in idx]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        wrapped = any(isinstance(layer, wrapper_class) for layer in self._layers()[:-1])
        return [wrapped for _ in self._get_indices(indices)]

    def _layers(self) -> list[VectorEnv]:
        """The wrapper chain, outermost first, ending with the ``GlanceFocusVectorEnv``."""
        layers = [self.env]
        while isinstance(layers[-1], VectorWrapper):
            layers.append(layers[-1].env)
        return layers

    def _holder(self, name: str, missing_ok: bool = False) -> Any:
        """The outermost layer that has attribute ``name`` (the outermost one if none has and ``missing_ok``)."""
        for layer in self._layers():
            if hasattr(layer, name):
                return layer
        if missing_ok:
            return self.env
        raise AttributeError(f"Neither {type(self.env).__name__} nor the envs it wraps have an attribute {name!r}.")

    def get_images(self) -> Sequence[np.ndarray | None]:
        return self._images(range(self.num_envs))

    def _images(self, indices: Sequence[int] | range) -> list[np.ndarray | None]:
        if self.base.render_mode != "rgb_array":
            warnings.warn("Rendering needs render_mode='rgb_array' when the env is built; returning None.",
                          stacklevel=3)
            return [None for _ in indices]
        return [self.base.render_slot(i) for i in indices]

    def _check_masks(self, name: str) -> None:
        if name == "action_masks" and self.base.action_mode not in GRID_MODES:
            raise AttributeError("action_masks exists for the grid action modes only (action='grid' or 'grid+stop').")


def _to_numpy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _row(obs: Any, i: int) -> Any:
    return {k: v[i] for k, v in obs.items()} if isinstance(obs, dict) else obs[i]


def _split_info(info: dict[str, Any], n: int, rows: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The vector info's per-slot scalars (``INFO_KEYS``) as one plain dict per slot (of ``n``), or per slot of
    ``rows`` in their order."""
    keys = [k for k in INFO_KEYS if k in info]
    if not keys:
        return [{} for _ in range(n if rows is None else len(rows))]
    columns = [_to_numpy(info[k]) if rows is None else _to_numpy(info[k])[rows] for k in keys]
    columns = [c.tolist() for c in columns]  # Python scalars, as .item() gives them
    return [dict(zip(keys, row)) for row in zip(*columns, strict=True)]
