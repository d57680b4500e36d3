"""The run-folder layout, written and read here only.

A stage-2 run folder ``RUN`` (``runs/<agent>/<env-name>_<n>/`` by default; the main job's ``runs/main/<env-name>_<n>/``
is one too) holds ``config.yml`` (agent, env id, env kwargs, hyperparameters), the agent's ``model``, ``last`` and
``best_model`` files (``.zip`` for SB3 agents, ``.pt`` for the others), ``checkpoints/``, ``evaluations.jsonl``,
``tb/``, and after stage 3 ``stage3/model.pt`` (the fine-tuned encoders and classifier). The main job adds
``results.json`` and ``results.md``. Stage 1 writes ``runs/stage1/<task>/{model.pt,last.pt,tb/}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from agents.learned import LearnedAgent, learned_agent_class

CONFIG = "config.yml"
MODEL_STEMS = ("best_model", "model", "last")
"""The agent files of a run, in the order an evaluation prefers them."""
STAGE3 = Path("stage3") / "model.pt"


def env_name(env_id: str) -> str:
    """``gfenv/GlanceFocus-v0`` -> ``GlanceFocus-v0``."""
    return env_id.rsplit("/", 1)[-1]


def run_dirs(agent: str, env_id: str, root: str | os.PathLike = "runs") -> list[Path]:
    """Existing ``<root>/<agent>/<env-name>_<n>`` folders, by n."""
    base, prefix = Path(root) / agent, f"{env_name(env_id)}_"
    found = [p for p in base.glob(f"{prefix}*") if p.is_dir() and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


def next_run_dir(agent: str, env_id: str, root: str | os.PathLike = "runs") -> Path:
    """``<root>/<agent>/<env-name>_<n>`` with n the next free integer (from 1)."""
    existing = run_dirs(agent, env_id, root)
    n = int(existing[-1].name.rsplit("_", 1)[-1]) + 1 if existing else 1
    return Path(root) / agent / f"{env_name(env_id)}_{n}"


def choose_run_dir(agent: str | None, env_id: str, run_dir: str | os.PathLike | None, resume: bool,
                   root: str | os.PathLike = "runs", default_agent: str = "ppo") -> Path:
    """``run_dir`` if given; else the agent's next free run folder, or its latest one to resume."""
    if run_dir is not None:
        return Path(run_dir)
    agent = agent or default_agent
    if not resume:
        return next_run_dir(agent, env_id, root)
    runs = run_dirs(agent, env_id, root)
    if not runs:
        raise FileNotFoundError(f"--resume: no run of {agent} on {env_id} under {Path(root) / agent}; pass "
                                f"--run-dir or start without --resume.")
    return runs[-1]


def stage3_checkpoint(run_dir: str | os.PathLike) -> Path:
    """Where stage 3 writes the fine-tuned model of run ``run_dir``."""
    return Path(run_dir) / STAGE3


def is_stage3_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names ``<run>/stage3/<file>.pt`` of a stage-2 run folder."""
    path = Path(path)
    return path.suffix == ".pt" and path.parent.name == STAGE3.parent.name and (path.parent.parent / CONFIG).is_file()


def run_folder(path: str | os.PathLike) -> Path:
    """The stage-2 run folder of a run folder, a file in one, or its stage-3 checkpoint."""
    path = Path(path)
    if is_stage3_checkpoint(path):
        return path.parent.parent
    return path if path.is_dir() else path.parent


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.yml``; FileNotFoundError naming the folder when there is none."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG} in {Path(run_dir)}: point at a run folder written by train_agent.py "
                                f"--stage 2 (or the main job), a file in one, or its stage3/model.pt.")
    return yaml.safe_load(path.read_text()) or {}


def write_config(run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    (Path(run_dir) / CONFIG).write_text(yaml.safe_dump(_plain(config), sort_keys=False))


def agent_file(run_dir: str | os.PathLike) -> Path:
    """The agent file an evaluation loads from a run folder: ``best_model``, else ``model``, else ``last``."""
    run_dir = Path(run_dir)
    found = [f for f in sorted(run_dir.iterdir()) if f.is_file() and f.stem in MODEL_STEMS]
    if not found:
        raise FileNotFoundError(f"No {', '.join(MODEL_STEMS)} file in {run_dir}.")
    return min(found, key=lambda f: MODEL_STEMS.index(f.stem))


def _plain(value: Any) -> Any:
    """``value`` with everything YAML cannot write plainly (classes, schedules, paths) as its ``str``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def load_agent(path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> LearnedAgent:
    """Load a trained agent from a run folder (its ``best_model``, else ``model``, else ``last``) or a file in one.

    The run folder's ``config.yml`` (written by ``train_agent.py --stage 2``) names the agent. A stage-3 checkpoint
    of a run, ``<run>/stage3/model.pt`` (written by ``train_agent.py --stage 3 --run-dir <run>``), loads the run's
    agent with that checkpoint as its env's model (``env_kwargs["checkpoint"]``): the policy with its fine-tuned
    classifier, as ``evaluate_agent.py --agents label=<run>/stage3/model.pt`` takes it.
    """
    path = Path(path)
    if is_stage3_checkpoint(path):
        if not path.is_file():
            raise FileNotFoundError(f"No stage-3 checkpoint {path}; write it with python train_agent.py --stage 3 "
                                    f"--run-dir {path.parent.parent}.")
        agent = load_agent(path.parent.parent, device=device, **kwargs)
        agent.env_kwargs = {**agent.env_kwargs, "checkpoint": str(path)}
        return agent
    run_dir = path if path.is_dir() else path.parent
    config = read_config(run_dir)
    if path.is_dir():
        path = agent_file(run_dir)
    cls = learned_agent_class(config["agent"])
    if cls is None or cls is LearnedAgent:
        raise ValueError(f"Agent {config['agent']!r} of {run_dir} has no registered LearnedAgent class to load it.")
    return cls.load(path, device=device, **kwargs)
