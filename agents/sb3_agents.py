"""Stable-Baselines3 and sb3-contrib algorithms as gfenv agents: one ``SB3Agent`` class, one ``SB3Spec`` per algorithm.

Each trains on ``gfenv.sb3.to_sb3(...)`` (train split, frozen encoders and classifier) and registers in ``AGENTS``:
``ppo``, ``a2c``, ``sac``, ``recurrent_ppo``, ``trpo``, ``maskable_ppo``, ``qrdqn``, ``ars``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import ARS, QRDQN, TRPO, MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from agents.features import GlanceFocusExtractor
from agents.learned import LearnedAgent, TrainingCallback, register_learned_agent
from gfenv.checkpoint import atomic_write
from gfenv.env import ACTION_MODES, GlanceFocusVectorEnv
from gfenv.flops import count_macs
from gfenv.rollout import FIXED_ENV_KWARGS, action_mode_error
from gfenv.sb3 import log_episode_statistics, to_sb3

AGENT_FILE = "gfenv_agent.json"
AGENT_FORMAT = "gfenv-sb3-agent-v1"
SCHEDULE_PREFIX = "lin_"
BOX_POLICIES = {"MultiInputPolicy": "MlpPolicy", "MultiInputLstmPolicy": "MlpLstmPolicy"}
POLICY_NAMES = {"nn": nn, "GlanceFocusExtractor": GlanceFocusExtractor}


class SlotCountingARS(ARS):
    """sb3-contrib's ARS counting one timestep per slot step.

    Its single-process candidate evaluation adds ``num_envs`` timesteps for every slot that steps (``num_envs**2``
    per vector step), so with 64 slots a budget ended 64 times too early. Here each slot step counts once and the
    callbacks (progress bar, evaluation, checkpoints) run once per ``num_envs`` counted steps.
    """

    def _trigger_callback(self, _locals: dict[str, Any], _globals: dict[str, Any], callback: BaseCallback,
                          n_envs: int) -> None:
        self.num_timesteps += 1
        self._slot_steps = getattr(self, "_slot_steps", 0) + 1
        if self._slot_steps % n_envs == 0:
            callback.on_step()


@dataclass(frozen=True)
class SB3Spec:
    """How one SB3 algorithm plugs into gfenv."""

    algo: type[BaseAlgorithm]
    """The SB3 / sb3-contrib algorithm class."""
    supported_actions: tuple[str, ...]
    """Action modes the algorithm can produce, in order of preference."""
    default_action: str
    """Action mode used when neither the hyperparameter file nor the CLI sets ``action``."""
    dict_policy: str | None
    """Policy for the Dict observation (None: the algorithm has no Dict-observation policy)."""
    flat_policy: str = "MlpPolicy"
    """Policy for the ``flat`` and ``gfnet`` (single Box) observations."""
    masks: bool = False
    """Pass ``env.action_masks()`` to ``predict`` (MaskablePPO)."""
    recurrent: bool = False
    """Keep LSTM states across ``act`` calls (RecurrentPPO)."""

    @property
    def default_observation(self) -> str:
        return "dict" if self.dict_policy else "flat"


GRID_MODES = ("grid", "grid+stop")
SB3_SPECS: dict[str, SB3Spec] = {
    "ppo": SB3Spec(PPO, ACTION_MODES, "grid", "MultiInputPolicy"),
    "a2c": SB3Spec(A2C, ACTION_MODES, "grid", "MultiInputPolicy"),
    "sac": SB3Spec(SAC, ("continuous",), "continuous", "MultiInputPolicy"),
    "recurrent_ppo": SB3Spec(RecurrentPPO, ACTION_MODES, "grid", "MultiInputLstmPolicy", "MlpLstmPolicy",
                             recurrent=True),
    "trpo": SB3Spec(TRPO, ACTION_MODES, "grid", "MultiInputPolicy"),
    "maskable_ppo": SB3Spec(MaskablePPO, GRID_MODES, "grid", "MultiInputPolicy", masks=True),
    "qrdqn": SB3Spec(QRDQN, GRID_MODES, "grid", "MultiInputPolicy"),
    "ars": SB3Spec(SlotCountingARS, ACTION_MODES, "continuous", None),  # no Dict-observation policy in sb3-contrib
}


def check_action(name: str, spec: SB3Spec, action: str) -> None:
    """``gfenv.rollout.action_mode_error`` for an algorithm, before an agent of it exists."""
    error = action_mode_error(name, spec.supported_actions, action)
    if error is not None:
        raise error


def resolve_env_kwargs(name: str, env_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The agent's env settings: the given ones plus its default action and observation mode, checked."""
    spec = SB3_SPECS[name]
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in (env_kwargs or {}).items()}
    fixed = sorted(set(FIXED_ENV_KWARGS) & set(kwargs))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} are set by the trainer (train split, num_envs, seed, device); drop them "
                         f"from the env kwargs.")
    kwargs.setdefault("action", spec.default_action)
    kwargs.setdefault("observation", spec.default_observation)
    check_action(name, spec, kwargs["action"])
    if kwargs["observation"] == "dict" and spec.dict_policy is None:
        raise ValueError(f"{name} has no policy for Dict observations (sb3-contrib supports Box observations only); "
                         f"use observation='flat' or 'gfnet'.")
    return kwargs


def parse_policy_kwargs(text: str) -> dict[str, Any]:
    """``"dict(net_arch=[64, 64], activation_fn=nn.Tanh)"`` (rl-zoo style) -> a dict, without ``eval``.

    Allowed: literals, lists, tuples, dicts, ``dict(...)`` calls and the names in ``POLICY_NAMES`` (``nn.X``).
    """

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
            return {kw.arg: value(kw.value) for kw in node.keywords}
        if isinstance(node, ast.Name) and node.id in POLICY_NAMES:
            return POLICY_NAMES[node.id]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nn":
            if isinstance(getattr(nn, node.attr, None), type):
                return getattr(nn, node.attr)
        raise ValueError(f"policy_kwargs {text!r}: cannot read {ast.unparse(node)!r} (allowed: literals, dict(...), "
                         f"nn.<Module>).")

    parsed = value(ast.parse(text.strip(), mode="eval").body)
    if not isinstance(parsed, dict):
        raise ValueError(f"policy_kwargs must describe a dict, got {text!r}.")
    return parsed


def _schedule(value: Any) -> Any:
    """``"lin_3e-4"`` -> a schedule decaying linearly from 3e-4 to 0 over training; other values unchanged."""
    if isinstance(value, str) and value.startswith(SCHEDULE_PREFIX):
        return LinearSchedule(float(value[len(SCHEDULE_PREFIX):]), 0.0, 1.0)
    return value


def sb3_kwargs(name: str, hyperparams: Mapping[str, Any], env: GlanceFocusVectorEnv) -> tuple[str, dict[str, Any]]:
    """(policy, algorithm kwargs) from rl-zoo style hyperparameters: ``lin_`` schedules, ``policy_kwargs`` as a
    string or dict, and the ``GlanceFocusExtractor`` by default for Dict observations (the user's
    ``features_extractor_class`` replaces it). Without ``policy`` the observation mode picks it; a Dict policy
    named for a Box observation (``flat``, ``gfnet``) becomes its Mlp counterpart (``BOX_POLICIES``)."""
    spec = SB3_SPECS[name]
    kwargs = {k: _schedule(v) for k, v in hyperparams.items()}
    zoo_only = sorted({"n_envs", "n_timesteps", "env_kwargs"} & set(kwargs))
    if zoo_only:
        raise ValueError(f"{', '.join(zoo_only)} belong to the trainer (gfenv.train.stage2), not to {name}'s kwargs.")
    valid = set(inspect.signature(spec.algo.__init__).parameters) - {"self", "env", "seed", "device", "verbose",
                                                                       "tensorboard_log", "_init_setup_model"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"Unknown {name} hyperparameter(s) {', '.join(unknown)}. Valid: {', '.join(sorted(valid))}.")
    dict_obs = env.observation_mode == "dict"
    policy = kwargs.pop("policy", None) or (spec.dict_policy if dict_obs else spec.flat_policy)
    if not dict_obs:
        policy = BOX_POLICIES.get(policy, policy)
    user = kwargs.pop("policy_kwargs", None) or {}
    user = parse_policy_kwargs(user) if isinstance(user, str) else dict(user)
    for key in ("activation_fn", "features_extractor_class"):
        if isinstance(user.get(key), str):
            user[key] = parse_policy_kwargs(f"dict(x={user[key]})")["x"]
    policy_kwargs = {}
    if dict_obs and "features_extractor_class" not in user:
        policy_kwargs = {"features_extractor_class": GlanceFocusExtractor,
                         "features_extractor_kwargs": {"glance_map_shape": tuple(env.glance_map_shape)}}
    policy_kwargs.update(user)
    if policy_kwargs:
        kwargs["policy_kwargs"] = policy_kwargs
    if isinstance(kwargs.get("train_freq"), list):
        kwargs["train_freq"] = tuple(kwargs["train_freq"])
    return policy, kwargs


class _CallbackBridge(BaseCallback):
    """Calls gfenv ``TrainingCallback``s from inside an SB3 ``learn`` after every vector step, and logs the training
    episodes' statistics (``gfenv.sb3.log_episode_statistics``: ``rollout/ep_correct_mean``, the accuracy after each
    glimpse, ...) next to SB3's ``rollout/ep_rew_mean``."""

    def __init__(self, agent: SB3Agent, callbacks: list[TrainingCallback]):
        super().__init__()
        self.agent, self.callbacks = agent, callbacks

    def _on_step(self) -> bool:
        return all([cb.on_step(self.agent, self.num_timesteps) is not False for cb in self.callbacks])

    def _on_rollout_end(self) -> None:
        log_episode_statistics(self.model)


class SB3Agent(LearnedAgent):
    """An SB3 model as a gfenv agent: ``learn`` on its training env, ``act`` deterministically on any env.

    ``act`` converts torch observations to numpy, calls ``model.predict(obs, deterministic=True)`` (with
    ``action_masks`` for MaskablePPO; with LSTM states and episode starts, taken from ``env.t``, for RecurrentPPO)
    and returns torch actions on ``env.device``; ``sample`` does the same with ``deterministic=False`` (stage 3's
    frozen mode samples the policy). ``save`` writes SB3's ``.zip`` atomically with a ``gfenv_agent.json`` entry
    (agent name, env kwargs) so that ``SB3Agent.load(path)`` needs nothing else.
    """

    checkpoint_suffix = ".zip"

    def __init__(self, name: str, model: BaseAlgorithm, env_kwargs: Mapping[str, Any], seed: int | None = None):
        super().__init__(seed)
        self.name, self.spec, self.model = name, SB3_SPECS[name], model
        self.env_kwargs = dict(env_kwargs)
        self.default_action = self.spec.default_action
        self.supported_actions = frozenset({self.env_kwargs["action"]})
        self._lstm_states: tuple[np.ndarray, ...] | None = None
        self.sample_generator = torch.Generator()
        if seed is None:
            self.sample_generator.seed()
        else:
            self.sample_generator.manual_seed(int(seed))

    @property
    def num_timesteps(self) -> int:
        return int(self.model.num_timesteps)

    def check_env(self, env: GlanceFocusVectorEnv) -> None:
        check_action(self.name, self.spec, env.action_mode)
        trained = (self.env_kwargs["action"], self.env_kwargs["observation"])
        if (env.action_mode, env.observation_mode) != trained:
            raise ValueError(f"{self.name} was trained with action={trained[0]!r}, observation={trained[1]!r}; "
                             f"build the env with those (the agent's env_kwargs).")

    def reset(self, env: GlanceFocusVectorEnv) -> None:
        super().reset(env)
        self._lstm_states = None

    def act(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        return self._predict(obs, env, deterministic=True)

    def sample(self, obs: Any, env: GlanceFocusVectorEnv) -> torch.Tensor:
        """Stochastic actions: ``model.predict(deterministic=False)``, with masks and LSTM states as in ``act``.

        What SB3 samples depends on the algorithm: PPO, A2C, TRPO, RecurrentPPO and MaskablePPO draw from the
        policy's distribution (MaskablePPO never draws a masked cell), SAC from its squashed Gaussian, QR-DQN is
        epsilon-greedy with its final ``exploration_rate`` (its random cells ignore the masks, as its ``act`` does),
        and ARS's linear policy is deterministic (``sample`` = ``act``). The draws come from the agent's own
        generator (seeded with ``seed``), so the same seed gives the same samples; torch's and numpy's global
        random states are left as they were.
        """
        seed = int(torch.randint(2**62, (1,), generator=self.sample_generator))
        cuda = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)  # QR-DQN's epsilon draw
                if hasattr(self.model, "exploration_rate"):
                    self.model.action_space.seed(seed)  # QR-DQN's random cells
                return self._predict(obs, env, deterministic=False)
        finally:
            np.random.set_state(np_state)

    def _predict(self, obs: Any, env: GlanceFocusVectorEnv, deterministic: bool) -> torch.Tensor:
        np_obs = _to_numpy(obs)
        if self.spec.recurrent:
            starts = (env.t <= 1).cpu().numpy()
            actions, self._lstm_states = self.model.predict(np_obs, state=self._lstm_states, episode_start=starts,
                                                            deterministic=deterministic)
        elif self.spec.masks:
            actions, _ = self.model.predict(np_obs, deterministic=deterministic, action_masks=env.action_masks())
        else:
            actions, _ = self.model.predict(np_obs, deterministic=deterministic)
        dtype = torch.float32 if env.action_mode == "continuous" else torch.long
        return torch.as_tensor(np.asarray(actions), device=env.device).to(dtype)

    @cached_property
    def macs_per_step(self) -> int:
        """Multiply-adds of one decision: the policy's forward pass on one observation (actor only)."""
        one = _zero_observation(self.model.observation_space)
        macs = count_macs(lambda o: self.model.policy.predict(o, deterministic=True), one)
        if self.spec.recurrent:  # FlopCounterMode does not count aten.lstm
            macs += _lstm_macs(self.model.policy.lstm_actor)
        return macs

    # ------------------------------------------------------------------------------------------------ training
    def learn(self, total_timesteps: int, callbacks: list | None = None, progress_bar: bool = False) -> None:
        """Train for ``total_timesteps`` more slot steps. ``callbacks``: gfenv ``TrainingCallback``s and/or SB3
        ``BaseCallback``s."""
        if self.model.get_env() is None:
            raise RuntimeError(f"This {self.name} agent has no training env; load it with num_envs=... to train.")
        callbacks = list(callbacks or [])
        ours = [cb for cb in callbacks if not isinstance(cb, BaseCallback)]
        sb3 = [cb for cb in callbacks if isinstance(cb, BaseCallback)]
        self.model.learn(total_timesteps, callback=CallbackList([*sb3, _CallbackBridge(self, ours)]),
                         progress_bar=progress_bar, tb_log_name=self.name,
                         reset_num_timesteps=self.model.num_timesteps == 0)

    def log_scalars(self, values: dict[str, float], num_timesteps: int) -> None:
        logger = getattr(self.model, "_logger", None)
        if logger is None:
            return
        for key, value in values.items():
            logger.record(key, value)
        logger.dump(num_timesteps)

    # ------------------------------------------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.suffix != ".zip":
            raise ValueError(f"SB3 agents save to a .zip file, got {path}.")
        meta = {"format": AGENT_FORMAT, "agent": self.name, "env_kwargs": self.env_kwargs,
                "num_timesteps": self.num_timesteps}

        def write(tmp: Path) -> None:
            self.model.save(tmp)
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(AGENT_FILE, json.dumps(meta, default=str))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", num_envs: int | None = None, seed: int | None = None,
             tensorboard_log: str | None = None, **kwargs: Any) -> SB3Agent:
        """Rebuild an agent saved by ``save``; with ``num_envs`` it also gets a training env (train split) so that
        ``learn`` continues where the saved model stopped (``num_timesteps`` included)."""
        meta = read_agent_file(path)
        name, env_kwargs = meta["agent"], meta["env_kwargs"]
        venv = None
        if num_envs is not None:
            venv = to_sb3(num_envs=num_envs, seed=seed, device=device, split="train", **env_kwargs)
        extra = {"tensorboard_log": tensorboard_log} if tensorboard_log is not None else {}
        model = SB3_SPECS[name].algo.load(path, env=venv, device=device, **extra, **kwargs)
        if seed is not None and venv is not None:
            model.set_random_seed(seed)
        return cls(name, model, env_kwargs, seed=seed)


def load_sb3_model(path: str | os.PathLike, name: str, env_kwargs: Mapping[str, Any],
                   device: str = "cpu") -> SB3Agent:
    """An SB3 model saved by another trainer (rl-baselines3-zoo) as the gfenv agent ``name``, to act on envs built
    with ``env_kwargs`` (its action and observation modes)."""
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in env_kwargs.items()}
    check_action(name, SB3_SPECS[name], kwargs["action"])
    model = SB3_SPECS[name].algo.load(path, device=device)
    return SB3Agent(name, model, kwargs)


def read_agent_file(path: str | os.PathLike) -> dict[str, Any]:
    """The ``gfenv_agent.json`` entry of an SB3 agent's ``.zip`` (agent name, env kwargs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved agent at {path}.")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(AGENT_FILE))
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{path} is not an SB3 agent saved by gfenv (SB3Agent.save): {err}") from err
    if meta.get("format") != AGENT_FORMAT or meta.get("agent") not in SB3_SPECS:
        raise ValueError(f"{path} holds an unknown agent format {meta.get('format')!r} / agent {meta.get('agent')!r}.")
    return meta


def build_sb3_agent(name: str, env_kwargs: Mapping[str, Any] | None = None, num_envs: int = 64, seed: int = 0,
                    device: str = "cpu", hyperparams: Mapping[str, Any] | None = None,
                    tensorboard_log: str | None = None) -> SB3Agent:
    """A fresh ``name`` agent with its SB3 model on ``to_sb3(num_envs, seed, split="train", **env_kwargs)``."""
    env_kwargs = resolve_env_kwargs(name, env_kwargs)
    venv = to_sb3(num_envs=num_envs, seed=seed, device=device, split="train", **env_kwargs)
    hyperparams = dict(hyperparams or {})
    if issubclass(SB3_SPECS[name].algo, ARS):
        hyperparams.setdefault("n_eval_episodes", num_envs)  # one episode per slot for each candidate
    policy, kwargs = sb3_kwargs(name, hyperparams, _gfenv(venv))
    model = SB3_SPECS[name].algo(policy, venv, seed=seed, device=device, tensorboard_log=tensorboard_log, verbose=0,
                                 **kwargs)
    return SB3Agent(name, model, env_kwargs, seed=seed)


def _gfenv(venv: VecEnv) -> GlanceFocusVectorEnv:
    return venv.venv.base if hasattr(venv, "venv") else venv.base


def _to_numpy(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _to_numpy(v) for k, v in obs.items()}
    return obs.detach().cpu().numpy() if isinstance(obs, torch.Tensor) else np.asarray(obs)


def _zero_observation(space: spaces.Space) -> Any:
    if isinstance(space, spaces.Dict):
        return {k: np.zeros((1, *s.shape), s.dtype) for k, s in space.spaces.items()}
    return np.zeros((1, *space.shape), space.dtype)


def _lstm_macs(lstm: nn.LSTM) -> int:
    """Multiply-adds of one time step of ``lstm`` (4 gates, input and recurrent weights, every layer)."""
    return sum(int(p.numel()) for n, p in lstm.named_parameters() if n.startswith("weight_"))


for _name in SB3_SPECS:
    register_learned_agent(_name, SB3Agent)(partial(build_sb3_agent, _name))
