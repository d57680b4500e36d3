"""Stage 2 of GFNet (policy learning) for any learned agent: train on the train split with the stage-1 encoders and
classifier frozen, evaluate on the validation split (carved from train), keep the best model, checkpoint, resume,
and save on Ctrl-C or SIGTERM.

Hyperparameters come rl-baselines3-zoo style from ``gfenv/train/hyperparams/<agent>.yml`` (``default`` block, then the
env id's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium
import yaml
from gymnasium.vector.vector_env import AutoresetMode

from agents.base import make_agent
from agents.learned import LearnedAgent, is_learned, learned_agent_class, learned_agent_names
from gfenv import ENV_ID
from gfenv.cache import cover_episodes
from gfenv.env import GlanceFocusVectorEnv
from gfenv.eval.evaluation import run_episodes
from gfenv.task import canonical_words, registered_words, resolve_task, task_words
from gfenv.train.runs import CONFIG, claim_run_dir, read_config, write_config, write_zoo_files
from gfenv.utils import check_device, check_fields, check_int

HYPERPARAMS_DIR = Path(__file__).resolve().parent / "hyperparams"
TRAINER_KEYS = ("n_envs", "n_timesteps", "env_kwargs")
DEFAULT_AGENT = "ppo"
DEFAULT_NUM_ENVS = 64
DEFAULT_TIMESTEPS = 100_000
MAX_EVAL_ENVS = 250


@dataclass
class PolicyTrainingConfig:
    """Stage-2 settings; ``None`` fields come from ``hyperparams/<agent>.yml``."""

    agent: str | None = None
    """Registered learned agent (``agents.AGENTS``), e.g. ppo, maskable_ppo, recurrent_ppo, sac, gfnet_ppo;
    None: ``DEFAULT_AGENT`` for a new run, the run's own agent when resuming."""
    env_id: str = ENV_ID
    """Gymnasium id of the env; its registered kwargs are the base env settings, and it picks the yml block."""
    env_kwargs: dict = field(default_factory=dict)
    """Env settings over the yml's ``env_kwargs`` (task, action, observation, reward, ...); keys the env does not
    take go into ``dataset_kwargs``, as in stage 1."""
    hyperparams: dict = field(default_factory=dict)
    """Agent hyperparameters over the yml's (``learning_rate=lin_3e-4``, ``policy_kwargs="dict(...)"``, ...)."""
    timesteps: int | None = None
    """Total training timesteps (slot steps); default the yml's ``n_timesteps``."""
    num_envs: int | None = None
    """Parallel env slots; default the yml's ``n_envs``."""
    seed: int = 0
    """Seeds the agent, the training env and the evaluation images."""
    device: str = "cpu"
    """Torch device of the env and the policy."""
    eval_freq: int = 10_000
    """Evaluate on the validation split every this many timesteps (0: only at the end; negative: never)."""
    eval_episodes: int = 500
    """Test images per evaluation (always the first ones, so evaluations compare)."""
    checkpoint_freq: int = 50_000
    """Save ``checkpoints/model_<N>_steps`` and ``last`` every this many timesteps (0: only at the end)."""
    progress: bool = True
    """Show SB3's progress bar."""
    trust_pickled_zip: bool = False
    """``--resume`` of an SB3 run whose ``last.zip`` can only be read by unpickling it (a zip from elsewhere, or one
    whose hyperparameters plain text cannot name): SB3's own loader, which runs any code the file carries. Off: the
    agent loads from its weights (``weights_only``) and plain-text settings."""

    def __post_init__(self) -> None:
        check_fields(self, "", {"timesteps": {"low": 1, "hint": "None: the yml's n_timesteps"},
                                "num_envs": {"low": 1, "hint": "None: the yml's n_envs"},
                                "seed": {"low": 0}, "eval_freq": {"low": -1, "hint": "0: at the end only, -1: never"},
                                "eval_episodes": {"low": 1}, "checkpoint_freq": {"low": 0, "hint": "0: at the end"}})


# ------------------------------------------------------------------------------------------------- configuration
def _hyperparams_file(agent: str, folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / f"{agent}.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def load_hyperparams(agent: str, env_id: str = ENV_ID, overrides: dict | None = None,
                     folder: str | os.PathLike = HYPERPARAMS_DIR) -> dict[str, Any]:
    """``<folder>/<agent>.yml``'s ``default`` block, then its ``env_id`` block, then ``overrides``; ``env_kwargs``
    are merged key by key (``hyperparams_source`` says which blocks there were). A missing file gives the
    algorithm's own defaults."""
    data = _hyperparams_file(agent, folder)
    merged: dict[str, Any] = {}
    for block in (data.get("default") or {}, data.get(env_id) or {}, overrides or {}):
        for key, value in block.items():
            if key == "env_kwargs":
                merged["env_kwargs"] = {**merged.get("env_kwargs", {}), **canonical_words(value or {})}
            else:
                merged[key] = value
    return merged


def hyperparams_source(agent: str, env_id: str, folder: str | os.PathLike = HYPERPARAMS_DIR) -> str:
    """Where ``load_hyperparams`` took its values from, for the run's ``config.yml`` and its first printed line."""
    data = _hyperparams_file(agent, folder)
    if not data:
        return f"no {agent}.yml in {folder}: the algorithm's own defaults"
    if env_id in data:
        return f"{agent}.yml: the default block, then the {env_id} block"
    return f"{agent}.yml: the default block only (it has no {env_id} block)"


# ------------------------------------------------------------------------------------------------------ callbacks
class EvalOnValidation:
    """Every ``eval_freq`` timesteps: accuracy per glimpse on the first ``episodes`` images of the validation split
    (carved from train, so the test split stays untouched until the final evaluation; deterministic actions,
    ``gfenv.eval.evaluation.run_episodes``); prints one line, logs ``eval/*`` to TensorBoard, appends to
    ``evaluations.jsonl`` and saves ``best_model`` when the score (mean accuracy after the focus steps, t = 2..T)
    improves."""

    def __init__(self, run_dir: Path, suffix: str, env_kwargs: dict[str, Any], eval_freq: int, episodes: int,
                 seed: int, device: str):
        self.run_dir, self.suffix, self.eval_freq, self.episodes, self.seed = run_dir, suffix, eval_freq, episodes, seed
        self.env_kwargs, self.device = env_kwargs, device
        self.log = run_dir / "evaluations.jsonl"
        self.best = max((r["score"] for r in self.history()), default=float("-inf"))
        self.last_eval = max((r["timesteps"] for r in self.history()), default=0)
        self._env: GlanceFocusVectorEnv | None = None

    def history(self) -> list[dict[str, Any]]:
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def on_step(self, agent: LearnedAgent, num_timesteps: int) -> bool:
        if self.eval_freq > 0 and num_timesteps - self.last_eval >= self.eval_freq:
            self.evaluate(agent, num_timesteps)
        return True

    def evaluate(self, agent: LearnedAgent, num_timesteps: int) -> dict[str, Any]:
        if self._env is None:
            self._env = GlanceFocusVectorEnv(num_envs=min(self.episodes, MAX_EVAL_ENVS), split="val",
                                             sampling="sequential", device=self.device,
                                             autoreset_mode=AutoresetMode.DISABLED,
                                             **cover_episodes(self.env_kwargs, self.episodes))
        result = run_episodes(agent, self._env, self.episodes, self.seed)
        acc = [round(a, 3) for a in result["accuracy"]]
        score = round(sum(acc[1:]) / max(len(acc) - 1, 1), 3)
        record = {"timesteps": int(num_timesteps), "split": "val", "episodes": self.episodes, "score": score,
                  "accuracy": acc,
                  "macs": [round(m) for m in result["macs"]], "glimpses": result["glimpses"]}
        with self.log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {"eval/score": score, "eval/accuracy_final": acc[-1], "eval/glimpses": result["glimpses"][-1]}
        scalars.update({f"eval/accuracy_t{t + 1}": a for t, a in enumerate(acc)})
        agent.log_scalars(scalars, num_timesteps)
        better = score > self.best
        if better:
            self.best = score
            agent.save(self.run_dir / f"best_model{self.suffix}")
        print(f"  {num_timesteps:>9,} timesteps: validation accuracy per glimpse ({self.episodes} images) "
              + " ".join(f"{a:.1f}" for a in acc) + (" (best so far: saved best_model)" if better else ""),
              flush=True)
        self.last_eval = num_timesteps
        return record


class PeriodicCheckpoint:
    """Every ``save_freq`` timesteps (slot steps, not vector steps): ``checkpoints/model_<N>_steps`` and ``last``."""

    def __init__(self, run_dir: Path, suffix: str, save_freq: int, start: int = 0):
        self.run_dir, self.suffix, self.save_freq, self.last_save = run_dir, suffix, save_freq, start

    def on_step(self, agent: LearnedAgent, num_timesteps: int) -> bool:
        if self.save_freq > 0 and num_timesteps - self.last_save >= self.save_freq:
            agent.save(self.run_dir / "checkpoints" / f"model_{num_timesteps}_steps{self.suffix}")
            agent.save(self.run_dir / f"last{self.suffix}")
            self.last_save = num_timesteps
        return True


# ------------------------------------------------------------------------------------------------------- training
def resolve_config(cfg: PolicyTrainingConfig) -> dict[str, Any]:
    """The run's settings (what ``config.yml`` holds): yml + CLI hyperparameters, env kwargs, envs, timesteps."""
    agent = cfg.agent or DEFAULT_AGENT
    if not is_learned(agent):
        raise ValueError(f"Agent {agent!r} is a fixed baseline: there is nothing to train. Learned agents: "
                         f"{', '.join(learned_agent_names())}.")
    if cfg.env_id not in gymnasium.registry:
        raise ValueError(f"Unknown env id {cfg.env_id!r}.")
    hyperparams = load_hyperparams(agent, cfg.env_id, cfg.hyperparams)
    env_kwargs = {**registered_words(cfg.env_id), **hyperparams.pop("env_kwargs", {}),
                  **canonical_words(cfg.env_kwargs)}
    yml_envs, yml_steps = hyperparams.pop("n_envs", DEFAULT_NUM_ENVS), hyperparams.pop("n_timesteps", DEFAULT_TIMESTEPS)
    num_envs = check_int("num_envs", cfg.num_envs, 1) if cfg.num_envs is not None else check_int(
        f"n_envs ({hyperparams_source(agent, cfg.env_id)})", yml_envs, 1)
    timesteps = check_int("timesteps", cfg.timesteps, 1) if cfg.timesteps is not None else check_int(
        f"n_timesteps ({hyperparams_source(agent, cfg.env_id)})", yml_steps, 1)
    for key in TRAINER_KEYS:
        hyperparams.pop(key, None)
    return {"agent": agent, "env": cfg.env_id, "env_kwargs": env_kwargs, "hyperparams": hyperparams,
            "hyperparams_from": hyperparams_source(agent, cfg.env_id),
            "seed": cfg.seed, "num_envs": num_envs, "timesteps": timesteps, "device": cfg.device,
            "eval": {"eval_freq": cfg.eval_freq, "eval_episodes": cfg.eval_episodes,
                     "checkpoint_freq": cfg.checkpoint_freq}}


def _suffix(agent: LearnedAgent) -> str:
    return getattr(agent, "checkpoint_suffix", ".pt")


def train_policy(cfg: PolicyTrainingConfig, run_dir: str | os.PathLike, resume: bool = False) -> LearnedAgent:
    """Train ``cfg.agent`` in ``run_dir``: ``config.yml``, TensorBoard under ``tb/``, ``evaluations.jsonl``,
    ``best_model``, periodic ``checkpoints/``, ``last`` and the final ``model`` (``.zip`` for SB3 agents).

    ``resume=True`` reloads ``last`` and the run's ``config.yml`` and trains on up to ``cfg.timesteps`` (or the
    run's). Ctrl-C saves ``last`` and re-raises KeyboardInterrupt. A task without a stage-1 checkpoint raises
    FileNotFoundError with the command that trains one. The folder is claimed before anything else
    (``gfenv.train.runs.claim_run_dir``): another process training in it is refused, naming it.
    """
    check_device(cfg.device)
    with claim_run_dir(run_dir):
        return _train_policy(cfg, Path(run_dir), resume)


def _train_policy(cfg: PolicyTrainingConfig, run_dir: Path, resume: bool) -> LearnedAgent:
    if resume:
        agent, config = _resume(cfg, run_dir)
    else:
        if (run_dir / CONFIG).exists():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume or pick another --run-dir.")
        config = resolve_config(cfg)
        # the whole task, as the stage-1 checkpoint records it (its data, data_root), goes into the run's config.yml;
        # without a stage-1 checkpoint the error says how to train one
        config["env_kwargs"].update(resolve_task(task_words(config["env_kwargs"])).words)
        agent = make_agent(config["agent"], env_kwargs=config["env_kwargs"], num_envs=config["num_envs"], seed=cfg.seed,
                           device=cfg.device, hyperparams=config["hyperparams"], tensorboard_log=str(run_dir / "tb"))
        config["env_kwargs"] = dict(agent.env_kwargs)
    print(f"stage 2: {summary(config)} -> {run_dir}" + (f" (resumed at {agent.num_timesteps})" if resume else "")
          + f"\n  hyperparameters: {config.get('hyperparams_from', '?')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    suffix = _suffix(agent)
    evaluator = EvalOnValidation(run_dir, suffix, config["env_kwargs"], cfg.eval_freq, cfg.eval_episodes,
                                config["seed"], cfg.device)
    saver = PeriodicCheckpoint(run_dir, suffix, cfg.checkpoint_freq, start=agent.num_timesteps)
    remaining = config["timesteps"] - agent.num_timesteps
    try:
        if remaining > 0:
            agent.learn(remaining, callbacks=[evaluator, saver], progress_bar=cfg.progress)
    except KeyboardInterrupt:
        agent.save(run_dir / f"last{suffix}")
        print(f"\nInterrupted at {agent.num_timesteps} timesteps: saved {run_dir / f'last{suffix}'}; continue with "
              f"--resume --run-dir {run_dir}.")
        raise
    agent.save(run_dir / f"last{suffix}")
    agent.save(run_dir / f"model{suffix}")
    write_zoo_files(run_dir, config, run_dir / f"model{suffix}")  # rl-baselines3-zoo's enjoy reads the run too
    if cfg.eval_freq >= 0 and evaluator.last_eval < agent.num_timesteps:
        evaluator.evaluate(agent, agent.num_timesteps)
    if evaluator.history():
        best = max(evaluator.history(), key=lambda r: r["score"])
        print(f"stage 2 ({config['agent']}) done: {agent.num_timesteps} timesteps; best accuracy per glimpse "
              f"({best.get('episodes', '?')} {best.get('split', 'test')} images, at {best['timesteps']} timesteps): "
              + " ".join(f"{a:.1f}" for a in best["accuracy"]) + f"\nrun: {run_dir}")
    return agent


def _resume(cfg: PolicyTrainingConfig, run_dir: Path) -> tuple[LearnedAgent, dict[str, Any]]:
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"--resume: no {CONFIG} in {run_dir}; start without --resume.")
    config = read_config(run_dir)
    if cfg.agent is not None and cfg.agent != config["agent"]:
        raise ValueError(f"--resume: {run_dir} trains {config['agent']!r}, not {cfg.agent!r}.")
    cls = learned_agent_class(config["agent"])
    if cls is None or cls is LearnedAgent:
        raise ValueError(f"--resume: agent {config['agent']!r} has no LearnedAgent class registered to load it.")
    last = run_dir / f"last{getattr(cls, 'checkpoint_suffix', '.pt')}"
    if not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}; start without --resume.")
    agent = cls.load(last, device=cfg.device, num_envs=config["num_envs"], seed=config["seed"],
                     tensorboard_log=str(run_dir / "tb"), trust_pickled_zip=cfg.trust_pickled_zip)
    if cfg.timesteps is not None:
        config["timesteps"] = cfg.timesteps
    config["device"] = cfg.device
    return agent, config


def summary(config: dict[str, Any]) -> str:
    """One line naming the run's agent, env, action mode, envs and budget."""
    kw = config["env_kwargs"]
    return (f"{config['agent']} on {config['env']} (action={kw.get('action')}, observation={kw.get('observation')}), "
            f"{config['num_envs']} envs, {config['timesteps']} timesteps, seed {config['seed']}")
