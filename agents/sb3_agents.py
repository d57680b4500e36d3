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
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import ARS, QRDQN, TRPO, MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.torch_layers import CombinedExtractor, FlattenExtractor, NatureCNN
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from agents.features import OPEN_LOOP_KEYS, GlanceFocusExtractor
from agents.learned import LearnedAgent, TrainingCallback, register_learned_agent
from gfenv.cache import without_cache
from gfenv.checkpoint import CheckpointError, atomic_write, load_weights
from gfenv.env import ACTION_MODES, GRID_MODES, GlanceFocusVectorEnv
from gfenv.flops import count_macs
from gfenv.rollout import FIXED_ENV_KWARGS, action_mode_error
from gfenv.sb3 import log_episode_statistics, to_sb3
from gfenv.utils import InvalidType, check_bool, check_choice, check_float, check_int

AGENT_FILE = "gfenv_agent.json"
AGENT_FORMAT = "gfenv-sb3-agent-v2"
"""v2 records what a safe load rebuilds the model from (hyperparameters, spaces, counters); v1 (before) did not."""
AGENT_FORMATS = ("gfenv-sb3-agent-v1", AGENT_FORMAT)
SCHEDULE_PREFIX = "lin_"
BOX_POLICIES = {"MultiInputPolicy": "MlpPolicy", "MultiInputLstmPolicy": "MlpLstmPolicy"}
POLICY_NAMES = {"nn": nn, "GlanceFocusExtractor": GlanceFocusExtractor, "CombinedExtractor": CombinedExtractor,
                "FlattenExtractor": FlattenExtractor, "NatureCNN": NatureCNN}
COUNTERS = ("_n_updates", "_episode_num", "_n_calls", "exploration_rate", "_current_progress_remaining")
"""Plain numbers of an SB3 model (beyond ``num_timesteps``) that a resumed run continues from."""
TRUST_HINT = ("load it with trust_pickled_zip=True (train_agent.py / evaluate_agent.py --trust-pickled-zip), which "
              "unpickles the file and so runs any code it carries: only for files you trust")


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
    vector_keys: tuple[str, ...] | None = None
    """The Dict observation's vectors the default extractor reads (None: all); without ``focus`` and ``memory`` the
    policy never sees what a patch showed: an open-loop agent."""

    @property
    def default_observation(self) -> str:
        return "dict" if self.dict_policy else "flat"


SB3_SPECS: dict[str, SB3Spec] = {
    "ppo": SB3Spec(PPO, ACTION_MODES, "grid", "MultiInputPolicy"),
    "a2c": SB3Spec(A2C, ACTION_MODES, "grid", "MultiInputPolicy"),
    "sac": SB3Spec(SAC, ("continuous",), "continuous", "MultiInputPolicy"),
    "recurrent_ppo": SB3Spec(RecurrentPPO, ACTION_MODES, "grid", "MultiInputLstmPolicy", "MlpLstmPolicy",
                             recurrent=True),
    "trpo": SB3Spec(TRPO, ACTION_MODES, "grid", "MultiInputPolicy"),
    "maskable_ppo": SB3Spec(MaskablePPO, GRID_MODES, "grid", "MultiInputPolicy", masks=True),
    # open loop: every cell chosen from the glance and its own earlier cells, never from what a patch showed
    "open_loop": SB3Spec(MaskablePPO, GRID_MODES, "grid", "MultiInputPolicy", masks=True,
                         vector_keys=OPEN_LOOP_KEYS),
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


POSITIVE_INTS = ("n_steps", "n_epochs", "buffer_size", "target_update_interval", "n_delta", "n_eval_episodes",
                 "cg_max_steps", "line_search_max_iter", "n_critic_updates", "sub_sampling_factor", "stats_window_size")
UNIT_FLOATS = ("gamma", "gae_lambda", "tau", "exploration_fraction", "exploration_initial_eps", "exploration_final_eps")
NONNEGATIVE_FLOATS = ("vf_coef", "cg_damping")
POSITIVE_FLOATS = ("rms_prop_eps",)
SCHEDULES = ("learning_rate", "clip_range", "clip_range_vf", "delta_std")
"""Hyperparameters that take a positive number or a ``lin_<start>`` schedule."""
BOOLS = ("normalize_advantage", "use_sde", "zero_policy", "use_rms_prop", "optimize_memory_usage",
         "use_sde_at_warmup")


def check_hyperparams(name: str, hyperparams: Mapping[str, Any]) -> None:
    """Refuse an SB3 hyperparameter of the wrong type or range (``n_steps=abc``, ``gamma=1.5``, ``batch_size=0``),
    naming the agent, the hyperparameter, its value and what is allowed, before SB3 sees it. Names without a rule
    here are checked against the type of the algorithm's default (an int default wants an int, a float default a
    number, a bool default a bool)."""
    spec = SB3_SPECS[name]
    zoo_only = sorted({"n_envs", "n_timesteps", "env_kwargs"} & set(hyperparams))
    if zoo_only:
        raise ValueError(f"{', '.join(zoo_only)} belong to the trainer (gfenv.train.stage2), not to {name}'s kwargs.")
    defaults = {k: p.default for k, p in inspect.signature(spec.algo.__init__).parameters.items()}
    valid = set(defaults) - {"self", "env", "seed", "device", "verbose", "tensorboard_log", "_init_setup_model"}
    unknown = sorted(set(hyperparams) - valid)
    if unknown:
        raise ValueError(f"Unknown {name} hyperparameter(s) {', '.join(unknown)}. Valid: {', '.join(sorted(valid))}.")
    for key, value in hyperparams.items():
        label = f"{name} hyperparameter {key}"
        if key in POSITIVE_INTS:
            check_int(label, value, 1)
        elif key == "batch_size":
            check_int(label, value, 2 if defaults.get("normalize_advantage") else 1,
                      hint="PPO's advantage normalisation needs 2" if defaults.get("normalize_advantage") else "")
        elif key == "n_top":
            check_int(label, value, 1, none=True)
        elif key == "learning_starts":
            check_int(label, value, 0)
        elif key in ("sde_sample_freq", "gradient_steps"):
            check_int(label, value, -1, hint="-1: " + ("only at the rollout's start" if key == "sde_sample_freq"
                                                       else "as many as env steps"))
        elif key in UNIT_FLOATS:
            check_float(label, value, 0.0, 1.0)
        elif key in NONNEGATIVE_FLOATS:
            check_float(label, value, 0.0)
        elif key in POSITIVE_FLOATS:
            check_float(label, value, above=0.0)
        elif key in ("max_grad_norm", "target_kl"):
            check_float(label, value, above=0.0, none=defaults.get(key, 0) is None or key == "target_kl")
        elif key == "line_search_shrinking_factor":
            check_float(label, value, above=0.0, high=1.0)
        elif key in SCHEDULES:
            if value is None and key == "clip_range_vf":
                continue
            if isinstance(value, str) and value.startswith(SCHEDULE_PREFIX):
                check_float(label, _schedule_start(label, value), above=0.0)
            elif not callable(value):
                check_float(label, value, above=0.0, hint=f"or a schedule {SCHEDULE_PREFIX}<start>, e.g. lin_3e-4")
        elif key in ("ent_coef", "target_entropy"):
            if isinstance(value, str):
                if not (value == "auto" or (key == "ent_coef" and value.startswith("auto_"))):
                    raise ValueError(f"{label}={value!r}: must be a number or 'auto'"
                                     + (" (or 'auto_<start>')" if key == "ent_coef" else "") + ".")
                if value.startswith("auto_"):
                    check_float(label, _schedule_start(label, value, "auto_"), above=0.0)
            else:
                check_float(label, value, 0.0 if key == "ent_coef" else None)
        elif key == "train_freq":
            if isinstance(value, (list, tuple)):
                if len(value) != 2:
                    raise ValueError(f"{label}={value!r}: must be an integer >= 1 or [n, 'step' or 'episode'].")
                check_int(label, value[0], 1)
                check_choice(f"{label}[1]", value[1], ("step", "episode"))
            else:
                check_int(label, value, 1, hint="or [n, 'step' or 'episode']")
        elif key in BOOLS:
            check_bool(label, value)
        elif key == "policy":
            if isinstance(value, str):
                check_choice(label, value, sorted(spec.algo.policy_aliases))
            elif not isinstance(value, type):
                raise InvalidType(f"{label}={value!r}: must be a policy name "
                                  f"({', '.join(sorted(spec.algo.policy_aliases))}).")
        elif key == "policy_kwargs":
            if value is not None and not isinstance(value, (str, Mapping)):
                raise InvalidType(f"{label}={value!r}: must be a dict or a string such as \"dict(net_arch=[64])\".")
        elif isinstance(defaults.get(key), bool):
            check_bool(label, value)
        elif isinstance(defaults.get(key), int) and not isinstance(value, bool):
            check_int(label, value)
        elif isinstance(defaults.get(key), float):
            check_float(label, value)


def _schedule_start(label: str, value: str, prefix: str = SCHEDULE_PREFIX) -> float:
    try:
        return float(value[len(prefix):])
    except ValueError:
        raise InvalidType(f"{label}={value!r}: {prefix}<start> needs a number after {prefix!r}, e.g. "
                          f"{prefix}0.001.") from None


def sb3_kwargs(name: str, hyperparams: Mapping[str, Any], env: GlanceFocusVectorEnv) -> tuple[str, dict[str, Any]]:
    """(policy, algorithm kwargs) from rl-zoo style hyperparameters: ``lin_`` schedules, ``policy_kwargs`` as a
    string or dict, and the ``GlanceFocusExtractor`` by default for Dict observations (the user's
    ``features_extractor_class`` replaces it). Without ``policy`` the observation mode picks it; a Dict policy
    named for a Box observation (``flat``, ``gfnet``) becomes its Mlp counterpart (``BOX_POLICIES``)."""
    spec = SB3_SPECS[name]
    check_hyperparams(name, hyperparams)
    kwargs = {k: _schedule(v) for k, v in hyperparams.items()}
    dict_obs = env.observation_mode == "dict"
    policy = kwargs.pop("policy", None) or (spec.dict_policy if dict_obs else spec.flat_policy)
    if not dict_obs:
        policy = BOX_POLICIES.get(policy, policy)
    user = kwargs.pop("policy_kwargs", None) or {}
    user = parse_policy_kwargs(user) if isinstance(user, str) else dict(user)
    for key in list(user):
        if (key.endswith("_fn") or key.endswith("_class")) and isinstance(user[key], str):
            user[key] = parse_policy_kwargs(f"dict(x={user[key]})")["x"]
    policy_kwargs = {}
    if dict_obs and "features_extractor_class" not in user:
        extractor = {"glance_map_shape": tuple(env.glance_map_shape)}
        if spec.vector_keys is not None:
            extractor["vector_keys"] = spec.vector_keys
        policy_kwargs = {"features_extractor_class": GlanceFocusExtractor,
                         "features_extractor_kwargs": {**extractor, **user.pop("features_extractor_kwargs", {})}}
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
    frozen mode samples the policy). ``save`` writes SB3's ``.zip`` atomically with a ``gfenv_agent.json`` entry:
    the agent, its env kwargs and what rebuilding the model takes (hyperparameters as given, spaces, counters), so
    that ``SB3Agent.load(path)`` reads JSON and the weights (``weights_only``) and never unpickles anything (see
    ``load``).
    """

    checkpoint_suffix = ".zip"

    def __init__(self, name: str, model: BaseAlgorithm, env_kwargs: Mapping[str, Any], seed: int | None = None,
                 hyperparams: Mapping[str, Any] | None = None,
                 glance_map_shape: tuple[int, ...] | None = None):
        super().__init__(seed)
        self.name, self.spec, self.model = name, SB3_SPECS[name], model
        self.env_kwargs = dict(env_kwargs)
        self.hyperparams = None if hyperparams is None else dict(hyperparams)
        """The hyperparameters the model was built with (rl-zoo style, before conversion): a safe load rebuilds it
        from them."""
        self.glance_map_shape = None if glance_map_shape is None else tuple(int(d) for d in glance_map_shape)
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
        dtype = torch.long if env.action_mode in GRID_MODES else torch.float32
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
        """SB3's ``.zip`` (so SB3 tools can open it) plus ``gfenv_agent.json``: the agent, env kwargs, timesteps and
        what a safe load rebuilds the model from: the hyperparameters as plain values (None, with the reason, when
        they hold something plain text cannot name, e.g. a class gfenv does not know), the spaces, the number of
        training slots and the training counters. Written atomically."""
        path = Path(path)
        if path.suffix != ".zip":
            raise ValueError(f"SB3 agents save to a .zip file, got {path}.")
        hyperparams, problem = plain_hyperparams(self.hyperparams)
        model = self.model
        meta = {"format": AGENT_FORMAT, "agent": self.name, "env_kwargs": self.env_kwargs,
                "num_timesteps": self.num_timesteps, "hyperparams": hyperparams, "hyperparams_problem": problem,
                "num_envs": int(model.n_envs), "observation_space": space_to_json(model.observation_space),
                "action_space": space_to_json(model.action_space),
                "glance_map_shape": list(self.glance_map_shape) if self.glance_map_shape else None,
                "counters": {k: getattr(model, k) for k in COUNTERS
                             if isinstance(getattr(model, k, None), (int, float)) and not isinstance(
                                 getattr(model, k), bool)}}

        def write(tmp: Path) -> None:
            self.model.save(tmp)
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(AGENT_FILE, json.dumps(meta, default=str))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", num_envs: int | None = None, seed: int | None = None,
             tensorboard_log: str | None = None, trust_pickled_zip: bool = False,
             run_config: dict[str, Any] | None = None, **kwargs: Any) -> SB3Agent:
        """Rebuild an agent saved by ``save``, safely: the model is built anew from the hyperparameters and spaces
        in ``gfenv_agent.json`` (JSON) and its weights, optimiser states and variables are read from the zip's
        ``*.pth`` entries with ``torch.load(weights_only=True)``; SB3's ``data`` entry (cloudpickle) is never read.
        Files written before gfenv stored those settings (format v1) rebuild from their run folder's settings
        (``run_config``, the ``config.yml`` that ``gfenv.train.runs.load_agent`` passes) and a one-slot env of the
        task. With ``num_envs`` the agent also gets a training env (train split) and
        continues where the saved model stopped (``num_timesteps``, optimiser states, exploration and update
        counters).

        ``trust_pickled_zip=True`` uses SB3's own loader instead, which unpickles the zip's ``data`` and so runs any
        code a crafted file carries: only for files you trust (e.g. SB3 zips written elsewhere)."""
        path = Path(path)
        if trust_pickled_zip:
            return cls._load_pickled(path, device, num_envs, seed, tensorboard_log, run_config, **kwargs)
        if kwargs:
            raise TypeError(f"SB3Agent.load() got unexpected arguments {sorted(kwargs)} (SB3's own load options are "
                            f"taken with trust_pickled_zip=True only).")
        meta = read_agent_file(path)
        name, env_kwargs = meta["agent"], meta["env_kwargs"]
        settings = _rebuild_settings(path, meta, run_config)
        spec = SB3_SPECS[name]
        if num_envs is not None:
            venv = to_sb3(num_envs=num_envs, seed=seed, device=device, split="train", **env_kwargs)
            for key in ("observation_space", "action_space"):
                if getattr(venv, key) != settings[key]:
                    raise CheckpointError(f"{path} was trained with {key} {settings[key]}, but its env kwargs now "
                                          f"build {getattr(venv, key)}: the task or its checkpoint changed since.")
        else:
            venv = _SpacesOnly(settings["num_envs"], settings["observation_space"], settings["action_space"])
        hyperparams = dict(settings["hyperparams"])
        env_like = SimpleNamespace(observation_mode=env_kwargs.get("observation", spec.default_observation),
                                   glance_map_shape=settings["glance_map_shape"])
        policy, algo_kwargs = sb3_kwargs(name, hyperparams, env_like)
        extra = {"tensorboard_log": tensorboard_log} if tensorboard_log is not None else {}
        model = spec.algo(policy, venv, seed=seed if num_envs is not None else None, device=device, verbose=0,
                          **extra, **algo_kwargs)
        _load_weights_into(model, path, device)
        model.num_timesteps = int(meta.get("num_timesteps", 0))
        for key, value in (meta.get("counters") or {}).items():
            if key in COUNTERS and hasattr(model, key):
                setattr(model, key, value)
        if isinstance(model, ARS):
            model.weights = torch.nn.utils.parameters_to_vector(model.policy.parameters()).detach()
        if getattr(model, "use_sde", False):
            model.policy.reset_noise()
        if num_envs is None:
            model.env = None  # built on a placeholder of the spaces: acts, but needs num_envs=... to train
        elif seed is not None:
            model.set_random_seed(seed)
        return cls(name, model, env_kwargs, seed=seed, hyperparams=hyperparams,
                   glance_map_shape=settings["glance_map_shape"])

    @classmethod
    def _load_pickled(cls, path: Path, device: str, num_envs: int | None, seed: int | None,
                      tensorboard_log: str | None, config: dict[str, Any] | None, **kwargs: Any) -> SB3Agent:
        """SB3's own ``load`` (unpickles the zip: runs any code it carries). The agent and env kwargs come from
        ``gfenv_agent.json``, else from the run folder's ``config.yml`` (a zip written elsewhere)."""
        try:
            meta = read_agent_file(path)
        except ValueError:
            if config is None or config.get("agent") not in SB3_SPECS:
                raise
            meta = {"agent": config["agent"], "env_kwargs": config.get("env_kwargs") or {},
                    "hyperparams": config.get("hyperparams")}
        name, env_kwargs = meta["agent"], resolve_env_kwargs(meta["agent"], meta["env_kwargs"])
        venv = None
        if num_envs is not None:
            venv = to_sb3(num_envs=num_envs, seed=seed, device=device, split="train", **env_kwargs)
        extra = {"tensorboard_log": tensorboard_log} if tensorboard_log is not None else {}
        model = SB3_SPECS[name].algo.load(path, env=venv, device=device, **extra, **kwargs)
        if seed is not None and venv is not None:
            model.set_random_seed(seed)
        shape = meta.get("glance_map_shape")
        return cls(name, model, env_kwargs, seed=seed, hyperparams=meta.get("hyperparams"),
                   glance_map_shape=shape)


class _SpacesOnly(VecEnv):
    """A stand-in env with the saved spaces and slot count: what an SB3 algorithm needs to build its model for
    acting. It cannot be stepped."""

    def __init__(self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space):
        super().__init__(num_envs, observation_space, action_space)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("This agent was loaded to act (no training env); load it with num_envs=... to train.")

    reset = step_async = step_wait = set_attr = env_method = _refuse

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        if attr_name == "render_mode":
            return [None] * self.num_envs
        return self._refuse()

    def close(self) -> None:
        pass

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs


def _load_weights_into(model: BaseAlgorithm, path: Path, device: str) -> None:
    """The zip's ``<name>.pth`` entries (policy, optimisers) and ``pytorch_variables.pth`` into the rebuilt
    ``model``, each read with ``weights_only=True``."""
    names, variables = model._get_torch_save_params()
    params = {}
    with zipfile.ZipFile(path) as archive:
        entries = set(archive.namelist())
        for name in names:
            entry = f"{name}.pth"
            if entry not in entries:
                raise CheckpointError(f"{path} has no {entry}: it is not a whole {type(model).__name__} agent "
                                      f"(entries: {', '.join(sorted(entries))}).")
            params[name] = load_weights(archive.read(entry), f"{path} ({entry})", device)
        stored = {}
        if variables and "pytorch_variables.pth" in entries:
            stored = load_weights(archive.read("pytorch_variables.pth"), f"{path} (pytorch_variables.pth)", device)
    try:
        model.set_parameters(params, exact_match=True, device=device)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}'s weights do not fit the {type(model).__name__} model its settings build: "
                              f"{str(err).splitlines()[0]}") from err
    for name in variables:
        if isinstance(stored, dict) and isinstance(stored.get(name), torch.Tensor):
            getattr(model, name).data = stored[name].data.to(getattr(model, name).device)


def _rebuild_settings(path: Path, meta: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """What rebuilding the model takes: hyperparameters, spaces, training slots and the glance map's shape. A v2
    file records them; a v1 file (written before) takes the hyperparameters from its run folder's ``config`` (yml)
    and the spaces from a one-slot env of its env kwargs. Refused, with how to load it anyway, when neither has
    them."""
    name = meta["agent"]
    if meta.get("format") == AGENT_FORMAT:
        if meta.get("hyperparams") is None:
            problem = meta.get("hyperparams_problem") or "it records no hyperparameters"
            raise CheckpointError(f"{path} cannot be rebuilt safely: {problem}. Re-save it with plain "
                                  f"hyperparameters, or {TRUST_HINT}.")
        try:
            observation_space = space_from_json(meta["observation_space"])
            action_space = space_from_json(meta["action_space"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: its {AGENT_FILE} has no readable spaces ({err}); {TRUST_HINT}.") from err
        shape = meta.get("glance_map_shape")
        return {"hyperparams": meta["hyperparams"], "observation_space": observation_space,
                "action_space": action_space, "num_envs": check_int("num_envs", meta.get("num_envs", 1), 1),
                "glance_map_shape": tuple(shape) if shape else None}
    if config is None or "hyperparams" not in config:
        raise CheckpointError(f"{path} was saved by an older gfenv that did not record its model's settings, and no "
                              f"run folder config.yml beside it has them; {TRUST_HINT}.")
    hyperparams = dict(config.get("hyperparams") or {})
    if issubclass(SB3_SPECS[name].algo, ARS):
        hyperparams.setdefault("n_eval_episodes", config.get("num_envs", 1))
    probe = GlanceFocusVectorEnv(num_envs=1, split="test", **without_cache(meta["env_kwargs"]))
    return {"hyperparams": hyperparams, "observation_space": probe.single_observation_space,
            "action_space": probe.single_action_space, "num_envs": int(config.get("num_envs", 1)),
            "glance_map_shape": tuple(probe.glance_map_shape)}


def load_sb3_model(path: str | os.PathLike, name: str, env_kwargs: Mapping[str, Any],
                   device: str = "cpu") -> SB3Agent:
    """An SB3 model saved by another trainer (rl-baselines3-zoo) as the gfenv agent ``name``, to act on envs built
    with ``env_kwargs`` (its action and observation modes)."""
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in env_kwargs.items()}
    check_action(name, SB3_SPECS[name], kwargs["action"])
    model = SB3_SPECS[name].algo.load(path, device=device)
    return SB3Agent(name, model, kwargs)


def read_agent_file(path: str | os.PathLike) -> dict[str, Any]:
    """The ``gfenv_agent.json`` entry of an SB3 agent's ``.zip`` (agent name, env kwargs, rebuild settings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved agent at {path}.")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(AGENT_FILE))
    except KeyError:
        raise ValueError(f"{path} has no {AGENT_FILE}: it is not an SB3 agent saved by gfenv (a zip from elsewhere "
                         f"can only be loaded by unpickling it); {TRUST_HINT}.") from None
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable SB3 agent zip ({type(err).__name__}: {err}); it is corrupt or "
                         f"truncated: re-create it.") from err
    if not isinstance(meta, dict) or meta.get("format") not in AGENT_FORMATS or meta.get("agent") not in SB3_SPECS:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{path} holds an unknown agent format {got!r} / agent "
                         f"{meta.get('agent') if isinstance(meta, dict) else None!r}.")
    if not isinstance(meta.get("env_kwargs"), dict):
        raise ValueError(f"{path}: its {AGENT_FILE} has no env_kwargs dict; re-create it.")
    return meta


# -------------------------------------------------------------------------------------- plain-text settings
def plain_hyperparams(hyperparams: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the hyperparameters as JSON values, None) or (None, why not): classes that ``parse_policy_kwargs`` reads
    back (``nn.<Module>``, ``POLICY_NAMES``) become their names; anything else (a schedule object, an unknown
    class) cannot be written as plain text."""
    if hyperparams is None:
        return None, "the agent was built without recorded hyperparameters"

    def plain(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {str(k): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        if isinstance(value, type):
            for label, known in POLICY_NAMES.items():
                if known is value:
                    return label
            if getattr(nn, value.__name__, None) is value:
                return f"nn.{value.__name__}"
        raise _NotPlain(f"{where}={value!r} cannot be written as plain text")

    try:
        return {str(k): plain(v, str(k)) for k, v in hyperparams.items()}, None
    except _NotPlain as err:
        return None, str(err)


class _NotPlain(Exception):
    pass


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """A Box, Discrete, MultiDiscrete, MultiBinary or Dict of them as JSON values (``space_from_json`` reads it)."""
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(v) for k, v in space.spaces.items()}}
    if isinstance(space, spaces.Box):
        def bound(a: np.ndarray) -> Any:
            flat = a.reshape(-1)
            return float(flat[0]) if flat.size and bool((flat == flat[0]).all()) else flat.tolist()

        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype), "low": bound(space.low),
                "high": bound(space.high)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    raise ValueError(f"cannot record a {type(space).__name__} space as plain text")


def space_from_json(data: Mapping[str, Any]) -> spaces.Space:
    kind = data["type"]
    if kind == "Dict":
        return spaces.Dict({k: space_from_json(v) for k, v in data["spaces"].items()})
    if kind == "Box":
        dtype, shape = np.dtype(data["dtype"]), tuple(int(d) for d in data["shape"])

        def bound(v: Any) -> np.ndarray:
            return np.full(shape, v, dtype) if np.isscalar(v) else np.asarray(v, dtype).reshape(shape)

        return spaces.Box(bound(data["low"]), bound(data["high"]), shape, dtype)
    if kind == "Discrete":
        return spaces.Discrete(int(data["n"]), start=int(data.get("start", 0)))
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(data["nvec"])
    if kind == "MultiBinary":
        return spaces.MultiBinary(data["n"])
    raise ValueError(f"unknown space type {kind!r}")


def build_sb3_agent(name: str, env_kwargs: Mapping[str, Any] | None = None, num_envs: int = 64, seed: int = 0,
                    device: str = "cpu", hyperparams: Mapping[str, Any] | None = None,
                    tensorboard_log: str | None = None) -> SB3Agent:
    """A fresh ``name`` agent with its SB3 model on ``to_sb3(num_envs, seed, split="train", **env_kwargs)``."""
    env_kwargs = resolve_env_kwargs(name, env_kwargs)
    hyperparams = dict(hyperparams or {})
    check_hyperparams(name, hyperparams)  # before the env is built: a bad value fails at once
    venv = to_sb3(num_envs=num_envs, seed=seed, device=device, split="train", **env_kwargs)
    if issubclass(SB3_SPECS[name].algo, ARS):
        hyperparams.setdefault("n_eval_episodes", num_envs)  # one episode per slot for each candidate
    env = _gfenv(venv)
    policy, kwargs = sb3_kwargs(name, hyperparams, env)
    try:
        model = SB3_SPECS[name].algo(policy, venv, seed=seed, device=device, tensorboard_log=tensorboard_log,
                                     verbose=0, **kwargs)
    except AssertionError as err:  # SB3's own checks of combinations (e.g. n_steps * n_envs > 1)
        raise ValueError(f"{name}: SB3 refuses these settings (num_envs={num_envs}, hyperparameters "
                         f"{hyperparams}): {err}") from None
    return SB3Agent(name, model, env_kwargs, seed=seed, hyperparams=hyperparams,
                    glance_map_shape=env.glance_map_shape)


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
