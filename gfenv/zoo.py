"""rl-baselines3-zoo on gfenv ids, as its plain command:

    python -m rl_zoo3.train --algo ppo --env gfenv/GlanceFocus-v0 --gym-packages gfenv

The zoo reads ``hyperparams/<algo>.yml`` of its own package unless given ``-conf``, and builds ``n_envs`` single envs
under ``DummyVecEnv``. ``--gym-packages gfenv`` imports gfenv after the zoo, and ``import gfenv`` then calls
``install()``, which changes two things of the zoo's ``ExperimentManager`` for gfenv ids (every other id is left as
the zoo has it):

- hyperparameters: without ``-conf``, gfenv's own file for the algorithm, ``gfenv/train/hyperparams/<algo>.yml``
  (the ones ``train_agent.py`` reads; ``ppo_lstm`` reads ``recurrent_ppo.yml``): the env id's block (a per-split id
  such as ``gfenv/GlanceFocus-test-v0`` reads its task's block), else its ``default`` block. For an algorithm without
  a gfenv file the zoo's own default block is used, with ``MultiInputPolicy`` for the env's Dict observation where it
  names ``MlpPolicy``. ``gfenv.sb3.EpisodeStatisticsCallback`` is added to the callbacks (accuracy after each
  glimpse, first correct glimpse and MACs in the zoo's TensorBoard logs).
- envs: one batched env of ``n_envs`` slots (``gfenv.sb3.to_sb3``, inside ``EpisodeStatistics``) instead of
  ``n_envs`` single envs under ``DummyVecEnv``, with the same monitor file (``<run>/0.monitor.csv``); VecNormalize,
  frame stacking and ``vec_env_wrapper`` apply as the zoo applies them; the evaluation env takes the training env's
  settings, then ``--eval-env-kwargs``. ``--vec-env subproc`` or an ``env_wrapper`` hyperparameter (a per-env
  Gymnasium wrapper) keeps the zoo's single envs.

In a process that imported gfenv before the zoo (a notebook, a test), call ``gfenv.zoo.install()`` once the zoo is
imported, or pass ``--gym-packages gfenv.zoo``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import gymnasium

from gfenv.task import SPLIT_IDS

HYPERPARAMS_DIR = Path(__file__).resolve().parent / "train" / "hyperparams"
ALGO_FILES = {"ppo_lstm": "recurrent_ppo"}
"""Zoo algorithm names whose gfenv file has another name."""
CALLBACK = "gfenv.sb3.EpisodeStatisticsCallback"
BOX_POLICIES = ("MlpPolicy", "CnnPolicy")


def is_gfenv_id(env_id: str) -> bool:
    """Whether ``env_id`` is registered with gfenv's entry point."""
    return env_id in gymnasium.registry and str(gymnasium.spec(env_id).entry_point).startswith("gfenv.")


def hyperparams_file(algo: str) -> Path | None:
    """gfenv's hyperparameter file for a zoo algorithm name, if there is one."""
    path = HYPERPARAMS_DIR / f"{ALGO_FILES.get(algo, algo)}.yml"
    return path if path.is_file() else None


def install() -> None:
    """Teach the already imported ``rl_zoo3.exp_manager.ExperimentManager`` gfenv's defaults for gfenv ids (once)."""
    from rl_zoo3.exp_manager import ExperimentManager

    if getattr(ExperimentManager, "_gfenv_installed", False):
        return
    read, create = ExperimentManager.read_hyperparameters, ExperimentManager.create_envs

    def read_hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        env_id = self.env_name.gym_id
        if not is_gfenv_id(env_id) or Path(self.config).resolve() != _zoo_file(self.algo):
            return read(self)  # another env, or the user's -conf file
        own = hyperparams_file(self.algo)
        if own is not None:
            self.config = str(own)
        with _block_of(self, own):
            hyperparams, saved = read(self)
        for params in (hyperparams, saved):
            if params.get("policy") in BOX_POLICIES and _dict_observation(env_id, params, self.env_kwargs):
                params["policy"] = "MultiInputPolicy"
            callbacks = params.get("callback") or []
            callbacks = [callbacks] if not isinstance(callbacks, list) else list(callbacks)
            if CALLBACK not in callbacks:
                params["callback"] = [*callbacks, CALLBACK]
        return hyperparams, saved

    def create_envs(self, n_envs: int, eval_env: bool = False, no_log: bool = False):
        if not _batched(self):
            return create(self, n_envs, eval_env, no_log)
        from gfenv.sb3 import to_sb3

        log_dir = None if eval_env or no_log else self.save_path
        # the evaluation env: the training env's settings, then --eval-env-kwargs (the zoo alone would build it
        # without the hyperparameter file's env_kwargs, e.g. continuous actions for a policy trained on the grid)
        words = {**gymnasium.spec(self.env_name.gym_id).kwargs, **(self.env_kwargs or {}),
                 **((self.eval_env_kwargs if eval_env else {}) or {})}
        env = to_sb3(num_envs=n_envs, seed=self.seed, monitor_file=os.path.join(log_dir, "0") if log_dir else None,
                     **words)
        if self.vec_env_wrapper is not None:
            env = self.vec_env_wrapper(env)
        env = self._maybe_normalize(env, eval_env)
        if self.frame_stack is not None:
            from stable_baselines3.common.vec_env import VecFrameStack

            env = VecFrameStack(env, self.frame_stack)
        return env

    ExperimentManager.read_hyperparameters = read_hyperparameters
    ExperimentManager.create_envs = create_envs
    ExperimentManager._gfenv_installed = True


def install_if_imported() -> None:
    """``install()`` when the zoo's experiment manager is imported (``import gfenv`` calls it: ``--gym-packages``)."""
    if "rl_zoo3.exp_manager" in sys.modules:
        install()


def _zoo_file(algo: str) -> Path:
    """The zoo's own hyperparameter file for ``algo`` (what it reads without ``-conf``)."""
    import rl_zoo3.exp_manager

    here = Path(rl_zoo3.exp_manager.__file__).parent
    root = here if (here / "hyperparams").is_dir() else here.parent
    return (root / "hyperparams" / f"{algo}.yml").resolve()


@contextlib.contextmanager
def _block_of(manager: Any, own: Path | None):
    """While the zoo reads ``own``: a per-split id reads its task's block (the file names tasks, not splits)."""
    env_id = manager.env_name.gym_id
    if own is None or env_id not in SPLIT_IDS:
        yield
        return
    import yaml

    base = SPLIT_IDS[env_id][0]
    if env_id in (yaml.safe_load(own.read_text()) or {}):
        yield
        return
    name = manager.env_name
    manager.env_name = type(name)(base)
    try:
        yield
    finally:
        manager.env_name = name


def _dict_observation(env_id: str, hyperparams: dict[str, Any], cli_kwargs: dict[str, Any] | None) -> bool:
    words = {**gymnasium.spec(env_id).kwargs, **(hyperparams.get("env_kwargs") or {}), **(cli_kwargs or {})}
    return words.get("observation", "dict") == "dict"


def _batched(manager: Any) -> bool:
    from stable_baselines3.common.vec_env import DummyVecEnv

    return (is_gfenv_id(manager.env_name.gym_id) and manager.vec_env_class is DummyVecEnv
            and manager.env_wrapper is None)
