"""The run-folder layout, written and read here only.

A stage-2 run folder ``RUN`` (``runs/<agent>/<env-name>_<n>/`` by default; the main job's ``runs/main/<env-name>_<n>/``
is one too) holds ``config.yml`` (agent, env id, env kwargs, hyperparameters), the agent's ``model``, ``last`` and
``best_model`` files (``.zip`` for SB3 agents, ``.pt`` for the others), ``checkpoints/``, ``evaluations.jsonl``,
``tb/``, and after stage 3 ``stage3/model.pt`` (the fine-tuned encoders and classifier). The main job adds
``results.json`` and ``results.md``. Stage 1 writes ``runs/stage1/<task>/{model.pt,last.pt,tb/}``.

A process that writes a run folder claims it first (``claim_run_dir``): ``RUN/.lock`` is created exclusively and held
with an advisory lock until the process ends, so a second process given the same folder is refused naming the
first, and a lock left by a process that died is taken over.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gfenv.checkpoint import atomic_write

if TYPE_CHECKING:
    from agents.learned import LearnedAgent


CONFIG = "config.yml"
LOCK = ".lock"
"""The file that marks a run folder in use (``claim_run_dir``)."""
MODEL_STEMS = ("best_model", "model", "last")
"""The agent files of a run, in the order an evaluation prefers them."""
STAGE3 = Path("stage3") / "model.pt"
ZOO_AGENTS = {"ppo": "ppo", "a2c": "a2c", "sac": "sac", "trpo": "trpo", "qrdqn": "qrdqn", "ars": "ars",
              "ppo_lstm": "recurrent_ppo"}
"""rl-baselines3-zoo's algorithm names -> gfenv's agent names."""


def env_name(env_id: str) -> str:
    """``gfenv/GlanceFocus-v0`` -> ``gfenv-GlanceFocus-v0``: rl-baselines3-zoo's name of the env (its run folders'
    and final model's), so that the zoo's ``enjoy`` finds a gfenv run and gfenv's commands a zoo run."""
    return env_id.replace("/", "-")


def _run_number(path: Path, env_id: str) -> int | None:
    """n of a run folder ``<env-name>_<n>`` (or the older ``<name without namespace>_<n>``) of ``env_id``."""
    for prefix in (f"{env_name(env_id)}_", f"{env_id.rsplit('/', 1)[-1]}_"):
        if path.name.startswith(prefix) and path.name[len(prefix):].isdigit():
            return int(path.name[len(prefix):])
    return None


def run_dirs(agent: str, env_id: str, root: str | os.PathLike = "runs") -> list[Path]:
    """Existing ``<root>/<agent>/<env-name>_<n>`` folders (and those of the older naming), by n."""
    base = Path(root) / agent
    found = [p for p in base.glob("*_*") if p.is_dir() and _run_number(p, env_id) is not None]
    return sorted(found, key=lambda p: _run_number(p, env_id))


def next_run_dir(agent: str, env_id: str, root: str | os.PathLike = "runs") -> Path:
    """``<root>/<agent>/<env-name>_<n>`` with n the next free integer (from 1)."""
    existing = run_dirs(agent, env_id, root)
    n = _run_number(existing[-1], env_id) + 1 if existing else 1
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
    """The run's ``config.yml`` (an rl-baselines3-zoo run folder's settings in the same words: ``zoo_config``);
    FileNotFoundError naming the folder when there is neither."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        if zoo_settings_dir(run_dir) is not None:
            return zoo_config(run_dir)
        raise FileNotFoundError(f"No {CONFIG} in {Path(run_dir)}: point at a run folder written by train_agent.py "
                                f"--stage 2 (or the main job) or by rl-baselines3-zoo, a file in one, or its "
                                f"stage3/model.pt.")
    return yaml.safe_load(path.read_text()) or {}


# -------------------------------------------------------------------------------------- rl-baselines3-zoo runs
def zoo_settings_dir(run_dir: str | os.PathLike) -> Path | None:
    """The settings folder of an rl-baselines3-zoo run folder (``logs/<algo>/<env-name>_<n>/<env-name>/`` with its
    ``config.yml`` and ``args.yml``), or None for another folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [d for d in sorted(run_dir.iterdir())
             if d.is_dir() and (d / "config.yml").is_file() and (d / "args.yml").is_file()]
    return found[0] if found else None


class _ZooLoader(yaml.SafeLoader):
    """Reads the zoo's ``config.yml``/``args.yml`` (``yaml.dump`` of OrderedDicts) without running arbitrary tags."""


def _ordered_dict(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    pairs = loader.construct_sequence(node.value[0], deep=True) if node.value else []
    return {k: v for k, v in pairs}


_ZooLoader.add_constructor("tag:yaml.org,2002:python/object/apply:collections.OrderedDict", _ordered_dict)
_ZooLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                           lambda loader, node: tuple(loader.construct_sequence(node)))


def zoo_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """An rl-baselines3-zoo run's settings in gfenv's ``config.yml`` words: ``agent`` (the gfenv name of its
    algorithm), ``env`` (a per-split id becomes its task's id), ``env_kwargs`` (the hyperparameter file's, then the
    command line's, as the zoo's ``enjoy`` takes them; the env's own defaults for the action and observation),
    ``timesteps``, ``seed``, ``hyperparams`` and ``format: rl-baselines3-zoo``."""
    from gfenv.task import SPLIT_IDS

    settings = zoo_settings_dir(run_dir)
    if settings is None:
        raise FileNotFoundError(f"{run_dir} is not an rl-baselines3-zoo run folder (no <env>/config.yml and args.yml).")
    hyperparams = yaml.load((settings / "config.yml").read_text(), Loader=_ZooLoader) or {}
    args = yaml.load((settings / "args.yml").read_text(), Loader=_ZooLoader) or {}
    algo = args.get("algo")
    if algo not in ZOO_AGENTS:
        raise ValueError(f"{run_dir}: the zoo's {algo!r} has no gfenv agent; gfenv reads zoo runs of "
                         f"{', '.join(sorted(ZOO_AGENTS))}.")
    if hyperparams.get("normalize") or (settings / "vecnormalize.pkl").is_file():
        raise ValueError(f"{run_dir} was trained with VecNormalize, whose statistics gfenv's evaluation does not "
                         "apply; train without normalize (gfenv's hyperparameter files do).")
    env_kwargs = dict(hyperparams.get("env_kwargs") or {})
    if args.get("env_kwargs") is not None:
        env_kwargs = dict(args["env_kwargs"])
    env_id = args.get("env")
    if env_id in SPLIT_IDS:
        env_id = SPLIT_IDS[env_id][0]
        env_kwargs.pop("split", None)
    env_kwargs.setdefault("action", "continuous")  # the env's defaults, which the zoo's envs were built with
    env_kwargs.setdefault("observation", "dict")
    timesteps = args.get("n_timesteps") if (args.get("n_timesteps") or 0) > 0 else hyperparams.get("n_timesteps")
    return {"agent": ZOO_AGENTS[algo], "env": env_id, "env_kwargs": env_kwargs, "timesteps": timesteps,
            "seed": args.get("seed"), "hyperparams": {k: v for k, v in hyperparams.items() if k != "env_kwargs"},
            "format": "rl-baselines3-zoo", "zoo_algo": algo}


def write_zoo_files(run_dir: str | os.PathLike, config: dict[str, Any], model: str | os.PathLike) -> Path | None:
    """Make a finished stage-2 run readable by rl-baselines3-zoo's ``enjoy`` (``-f runs --exp-id <n>``): its settings
    in the zoo's layout, ``<run>/<env-name>/config.yml`` (hyperparameters with ``env_kwargs``) and ``args.yml``, and
    the final model as ``<run>/<env-name>.zip`` (a hard link to ``model``, a copy where links fail). Only for the
    agents the zoo has (``ZOO_AGENTS``); returns the settings folder, or None."""
    zoo_algos = {agent: algo for algo, agent in ZOO_AGENTS.items()}
    if config.get("agent") not in zoo_algos or Path(model).suffix != ".zip":
        return None
    run_dir, name = Path(run_dir), env_name(config["env"])
    settings = run_dir / name
    settings.mkdir(exist_ok=True)
    hyperparams = {**_plain(config.get("hyperparams") or {}), "env_kwargs": _plain(config["env_kwargs"]),
                   "n_envs": config.get("num_envs"), "n_timesteps": config.get("timesteps")}
    (settings / "config.yml").write_text(yaml.safe_dump(hyperparams, sort_keys=True))
    args = {"algo": zoo_algos[config["agent"]], "env": config["env"], "env_kwargs": _plain(config["env_kwargs"]),
            "seed": config.get("seed"), "n_timesteps": config.get("timesteps"), "written_by": "gfenv stage 2"}
    (settings / "args.yml").write_text(yaml.safe_dump(args, sort_keys=False))
    target = run_dir / f"{name}.zip"
    target.unlink(missing_ok=True)
    try:
        os.link(model, target)
    except OSError:
        import shutil

        shutil.copyfile(model, target)
    return settings


def zoo_model_file(run_dir: str | os.PathLike) -> Path:
    """The model an evaluation loads from a zoo run: ``best_model.zip``, else the final ``<env-name>.zip``."""
    run_dir, settings = Path(run_dir), zoo_settings_dir(run_dir)
    for path in (run_dir / "best_model.zip", run_dir / f"{settings.name}.zip"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"No best_model.zip or {settings.name}.zip in {run_dir}.")


def write_config(run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """``config.yml``, written atomically (``gfenv.checkpoint.atomic_write``)."""
    text = yaml.safe_dump(_plain(config), sort_keys=False)
    atomic_write(Path(run_dir) / CONFIG, lambda tmp: tmp.write_text(text))


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


class RunDirInUse(ValueError):
    """A run folder that another live process is writing."""


_HELD: dict[Path, list] = {}  # this process's claims: folder -> [lock fd, depth, folder created by the claim]


@contextlib.contextmanager
def claim_run_dir(run_dir: str | os.PathLike, flag: str = "--run-dir") -> Iterator[Path]:
    """Claim ``run_dir`` for this process before anything is written into it, and release it on exit.

    The folder is made (a path that is a file, or a folder that cannot be written, is refused naming ``flag``), then
    ``RUN/.lock`` is created with O_EXCL and locked (``fcntl.flock``): a second process that claims the folder while
    the first holds it gets RunDirInUse naming the first (pid, host, start, command); a lock file whose process died
    is taken over (the kernel dropped its lock). A claim is reentrant within a process (the main job's stage 2
    runs inside its claim). On exit the lock file is removed, and so is the folder when the claim made it and it
    is still empty (an argument refused before training leaves nothing behind)."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield run_dir
        finally:
            _HELD[key][1] -= 1
        return
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{flag} {run_dir} is a file (or lies under one), not a folder; pick another "
                         f"{flag}.") from None
    except OSError as err:
        raise ValueError(f"{flag} {run_dir} cannot be created ({err.strerror or err}); pick a writable "
                         f"{flag}.") from None
    fd = _lock(run_dir, flag)
    _HELD[key] = [fd, 1, created]
    failed = False
    try:
        yield run_dir
    except BaseException:
        failed = True
        raise
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(run_dir / LOCK)
        os.close(fd)
        if failed and created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty


def _lock(run_dir: Path, flag: str) -> int:
    """Create (or take over) and lock ``run_dir/.lock``; its content names this process."""
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # released meanwhile: create it again
                continue
        except OSError as err:
            raise ValueError(f"{flag} {run_dir} cannot be written ({err.strerror or err}); pick a writable "
                             f"{flag}.") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks (Windows): the exclusive create alone, and no take-over
            if os.fstat(fd).st_size:
                os.close(fd)
                raise RunDirInUse(f"{flag} {run_dir} is in use by another run ({_holder(path)}); if no such run "
                                  f"is alive, delete {path}.") from None
        except OSError:
            holder = _holder(path)
            os.close(fd)
            raise RunDirInUse(f"{flag} {run_dir} is in use by another run ({holder}); wait for it to end or pick "
                              f"another {flag}.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: start again
            os.close(fd)
            continue
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        return fd


def _holder(path: Path) -> str:
    """Who holds the lock file ``path``, as its record says."""
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "a process that left no readable record"
    if not record:
        return "a process that is starting"
    return (f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')}: "
            f"{record.get('command') or '?'}")


def load_agent(path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> LearnedAgent:
    """Load a trained agent from a run folder (its ``best_model``, else ``model``, else ``last``) or a file in one;
    an rl-baselines3-zoo run folder (``logs/<algo>/<env-name>_<n>``: its ``best_model.zip``, else the final model)
    loads as the gfenv agent of its algorithm (``zoo_config``).

    The run folder's ``config.yml`` (written by ``train_agent.py --stage 2``) names the agent. A stage-3 checkpoint
    of a run, ``<run>/stage3/model.pt`` (written by ``train_agent.py --stage 3 --run-dir <run>``), loads the run's
    agent with that checkpoint as its env's model (``env_kwargs["checkpoint"]``): the policy with its fine-tuned
    classifier, as ``evaluate_agent.py --agents label=<run>/stage3/model.pt`` takes it.

    Nothing in the folder is unpickled: agents load from weights (``weights_only``) and plain-text settings.
    ``trust_pickled_zip=True`` (in ``kwargs``) lets an SB3 agent load with SB3's own loader instead, which runs any
    code a crafted zip carries: only for files you trust.
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
    if config.get("format") == "rl-baselines3-zoo":
        from agents.sb3_agents import load_sb3_model

        return load_sb3_model(zoo_model_file(run_dir) if path.is_dir() else path, config["agent"],
                              config["env_kwargs"], device=device)
    if path.is_dir():
        path = agent_file(run_dir)
    from agents.learned import LearnedAgent, learned_agent_class  # the agents import SB3: only when loading one

    cls = learned_agent_class(config["agent"])
    if cls is None or cls is LearnedAgent:
        raise ValueError(f"Agent {config['agent']!r} of {run_dir} has no registered LearnedAgent class to load it.")
    if "run_config" in inspect.signature(cls.load).parameters:  # files from before a format recorded everything
        kwargs = {"run_config": config, **kwargs}
    return cls.load(path, device=device, **kwargs)
