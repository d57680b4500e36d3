"""Checkpoints: atomic saves, safe (``weights_only``) loads with clear errors, and the standard model file format.

A model checkpoint is ``{"format": "gfenv-model-v1", "config": ModelConfig.to_dict(), "model": state_dict,
"meta": {}}``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from gfenv.models import GFNetModel, ModelConfig

MODEL_FORMAT = "gfenv-model-v1"
_RETRAIN_HINT = "train a stage-1 checkpoint for this task or pass the matching checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, of another format, or made for another task."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file in ``path``'s folder, fsync it, then ``os.replace`` it onto ``path``.

    A reader never sees a half-written file, and an interrupted save leaves the previous one intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing file raises FileNotFoundError, a bad one
    CheckpointError (``UnsafeFileError`` when the file holds more than tensors and plain values: a pickle that a
    full load would run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    payload = load_weights(path, f"Checkpoint {path}", map_location)
    if not isinstance(payload, dict):
        raise CheckpointError(f"Checkpoint {path} holds a {type(payload).__name__}, not a dict; re-create it.")
    return payload


class UnsafeFileError(CheckpointError):
    """A file that holds Python objects other than tensors and plain values: only a full unpickle, which runs code
    from the file, could read it. gfenv never does; the message says what the file holds."""


def load_weights(source: str | os.PathLike | bytes, label: str, map_location: Any = "cpu") -> Any:
    """``torch.load(source, weights_only=True)`` of a file path or of a file's bytes (e.g. an entry of a zip),
    ``label`` naming it in errors: a file that holds anything but tensors and plain values (a crafted pickle) raises
    UnsafeFileError saying what it holds; a corrupt, truncated or empty one CheckpointError."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # a plain pickle: refused below
            return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.findall(r"GLOBAL ([\w.]+)", text) if "Weights only load failed" in text else []
        found = found or (_pickled_globals(source) if "Weights only load failed" in text else [])
        if found:
            raise UnsafeFileError(
                f"{label} holds Python objects ({', '.join(dict.fromkeys(found))}), which a safe (weights_only) load "
                f"refuses: a full load would run code from the file. gfenv writes only tensors and plain values, so "
                f"this file was not written by gfenv (or was altered); do not load it unless you trust where it came "
                f"from.") from None
        detail = (text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip()
                  else "UnpicklingError")
        raise CheckpointError(f"{label} is corrupt or truncated, or not a torch weights file, and cannot be read "
                              f"({detail}); delete it and re-create it (re-run the run that wrote it).") from err
    except Exception as err:
        detail = f"{type(err).__name__}: {err}".split(". ")[0] if str(err) else type(err).__name__
        empty = (isinstance(source, bytes) and not source) or (not isinstance(source, bytes) and _is_empty(source))
        raise CheckpointError(
            f"{label} is {'empty' if empty else 'corrupt or truncated'} and cannot be read ({detail}); "
            f"delete it and re-create it (re-run the run that wrote it).") from err


def _pickled_globals(source: str | os.PathLike | bytes, limit: int = 1 << 24) -> list[str]:
    """``pickle_globals`` of a file (its first ``limit`` bytes) or of bytes; [] for data that is not a pickle."""
    try:
        if isinstance(source, bytes):
            return pickle_globals(source)
        with Path(source).open("rb") as f:
            return pickle_globals(f.read(limit))
    except ValueError:
        return []


def pickle_globals(data: bytes) -> list[str]:
    """The Python names (``module.name``) a pickle would import and call, read with ``pickletools`` without running
    anything (GLOBAL, and STACK_GLOBAL with its two strings, pushed or fetched from the memo); ValueError when
    ``data`` is not a whole pickle (empty, truncated or garbage), saying where it stops."""
    import pickletools

    names: list[str] = []
    strings: list[Any] = []  # the values of the string pushes and memo fetches, in order
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                module, name = strings[-2:] if len(strings) >= 2 else (None, None)
                names.append(f"{module}.{name}")
            elif op.name in ("MEMOIZE",):
                memo[len(memo)] = strings[-1] if strings else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(int(arg)))
            elif (isinstance(arg, str) and "UNICODE" in op.name) or op.name in ("STRING", "BINSTRING",
                                                                              "SHORT_BINSTRING"):
                strings.append(arg)
    except Exception as err:
        raise ValueError(f"not a whole pickle ({err})") from None
    if not data:
        raise ValueError("empty")
    return names


def _is_empty(path: str | os.PathLike) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def save_model(path: str | os.PathLike, model: GFNetModel, meta: dict | None = None) -> Path:
    """Save ``model`` in the standard format (config, CPU state_dict, ``meta``) atomically."""
    payload = {
        "format": MODEL_FORMAT,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_checkpoint(path, payload)


def _mismatch(path: Path, key: str, stored: Any, wanted: Any) -> str:
    if key == "num_classes":
        return f"checkpoint {path} was trained for num_classes={stored} but the data has {wanted} classes"
    return f"checkpoint {path} was trained with {key}={stored!r} but {key}={wanted!r} was requested"


def check_config(path: str | os.PathLike, config: dict, expect: dict) -> None:
    """Raise CheckpointError naming every key on which ``config`` (from ``path``) and ``expect`` disagree."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(expect) - known)
    if unknown:
        raise ValueError(f"Unknown model config key(s) {unknown}; valid keys: {sorted(known)}.")
    defaults = ModelConfig().to_dict()
    problems = [
        _mismatch(Path(path), key, config.get(key, defaults[key]), wanted)
        for key, wanted in expect.items()
        if config.get(key, defaults[key]) != wanted
    ]
    if problems:
        raise CheckpointError("; ".join(problems) + f"; {_RETRAIN_HINT}.")


def load_model(
    path: str | os.PathLike, expect: dict | None = None, map_location: Any = "cpu"
) -> tuple[GFNetModel, dict]:
    """Rebuild a model saved by ``save_model``; returns (model, meta).

    ``expect`` (e.g. ``{"num_classes": 100, "backbone": "resnet18"}``) must agree with the stored config, else a
    CheckpointError names each mismatched key with both values. The state dict must match the model exactly.
    """
    path = Path(path)
    payload = load_checkpoint(path, map_location=map_location)
    fmt = payload.get("format")
    if fmt != MODEL_FORMAT:
        found = "no 'format' key" if fmt is None else f"format {fmt!r}"
        raise CheckpointError(
            f"Checkpoint {path} is not a gfenv model checkpoint: it has {found}, expected {MODEL_FORMAT!r}. "
            f"Save models with gfenv.checkpoint.save_model."
        )
    for key in ("config", "model"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"Checkpoint {path} has no {key!r} dict; it is incomplete, re-create it.")
    config = payload["config"]
    if expect:
        check_config(path, config, expect)
    try:
        model = GFNetModel(ModelConfig(**config))
    except TypeError as err:
        raise CheckpointError(f"Checkpoint {path} has a config this version cannot build: {err}") from err
    _load_state_strict(path, model, payload["model"])
    meta = payload.get("meta") or {}
    return model, dict(meta)


def _load_state_strict(path: Path, model: torch.nn.Module, state: dict) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} {items[:5]}{more}")
        raise CheckpointError(
            f"Checkpoint {path}'s weights do not match the model its config builds: {'; '.join(parts)}."
        )
    model.load_state_dict(state, strict=True)
