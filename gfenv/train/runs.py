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
    """Load a trained agent from a run folder (its ``best_model``, else ``model``, else ``last``) or a file in one.

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
    if path.is_dir():
        path = agent_file(run_dir)
    from agents.learned import LearnedAgent, learned_agent_class  # the agents import SB3: only when loading one

    cls = learned_agent_class(config["agent"])
    if cls is None or cls is LearnedAgent:
        raise ValueError(f"Agent {config['agent']!r} of {run_dir} has no registered LearnedAgent class to load it.")
    if "run_config" in inspect.signature(cls.load).parameters:  # files from before a format recorded everything
        kwargs = {"run_config": config, **kwargs}
    return cls.load(path, device=device, **kwargs)
