"""Small helpers shared by the command lines and the library: glibc's freed-memory setting, key=value parsing, and
the argument checks (type and range, named in every message) that the env, the trainers and the command lines use."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed blocks of up to ``limit`` bytes for reuse instead of returning them to the OS.

    A CPU step of the batched env allocates tens of MB of fresh tensors (the images of the new episodes, the
    encoders' activations). By default glibc hands big blocks back to the kernel when they are freed, so the next
    allocation touches new pages, and the page faults (about 3,000 per step of 256 slots, counted with
    ``resource.getrusage``) cost as much as the env's own bookkeeping. This is what jemalloc/tcmalloc do for
    PyTorch; the price is that the process keeps its peak heap. The project's scripts call it at start
    (``train_agent.py``, ``evaluate_agent.py``, ``python -m gfenv.bench``); set ``GFENV_KEEP_FREED_MEMORY=0`` to
    opt out. Returns True when the setting took effect (False off glibc, e.g. on macOS or Windows).
    """
    if os.environ.get("GFENV_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    ok = True
    for param in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD):
        # glibc versions that cap the mmap threshold (at 32 MiB) refuse a larger one: fall back to the cap
        ok &= bool(mallopt(param, limit) or mallopt(param, 32 << 20))
    return ok


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kv(items: list[str] | None, flag: str = "") -> dict[str, Any]:
    """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'}; refuses an item without '=' or with an empty key, and a key given
    twice with different values (naming ``flag``, the command-line option the items came from)."""
    out: dict[str, Any] = {}
    where = f"{flag} " if flag else ""
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where}{item!r}: expected key=value, got {item!r}.")
        key, parsed = key.strip(), parse_value(value.strip())
        if key in out and out[key] != parsed:
            raise ValueError(f"{where}{key} is given twice ({key}={out[key]!r} and {key}={parsed!r}); give it once.")
        out[key] = parsed
    return out


# ------------------------------------------------------------------------------------------------- argument checks
class InvalidType(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError`` for the library's callers, and a ``ValueError`` too, so the
    command lines report it like any other bad value (one line, exit 2)."""


def _describe(value: Any) -> str:
    return f"{value!r} (type {type(value).__name__})" if not isinstance(value, str) else repr(value)


def _bounds(low: float | None, high: float | None, above: float | None) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {above}")
    if low is not None:
        parts.append(f">= {low}")
    if high is not None:
        parts.append(f"<= {high}")
    return " and ".join(parts)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *, none: bool = False,
              hint: str = "") -> int | None:
    """``value`` as an int in [low, high]; None passes when ``none``. A bool, a string or a float that is not a whole
    number is refused (InvalidType) naming ``name`` and what is allowed; an int out of range raises ValueError."""
    allowed = "an integer" + (f" {_bounds(low, high, None)}" if low is not None or high is not None else "")
    allowed += " or None" if none else ""
    allowed += f" ({hint})" if hint else ""
    if value is None and none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise InvalidType(f"{name}={_describe(value)}: must be {allowed}.")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise InvalidType(f"{name}={value!r}: must be {allowed}, not a fraction.")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name}={value!r}: must be {allowed}.")
    return number


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                above: float | None = None, none: bool = False, hint: str = "") -> float | None:
    """``value`` as a finite float with ``low <= value <= high`` and ``value > above``; None passes when ``none``.
    A bool or string is refused (InvalidType), NaN, inf or a value out of range (ValueError), naming ``name``."""
    bounds = _bounds(low, high, above)
    allowed = "a finite number" + (f" {bounds}" if bounds else "") + (" or None" if none else "")
    allowed += f" ({hint})" if hint else ""
    if value is None and none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidType(f"{name}={_describe(value)}: must be {allowed}.")
    number = float(value)
    if (not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high)
            or (above is not None and number <= above)):
        raise ValueError(f"{name}={value!r}: must be {allowed}.")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's included); anything else, 0 and 1 too, is refused naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidType(f"{name}={_describe(value)}: must be true or false.")
    return bool(value)


def check_choice(name: str, value: Any, choices: Iterable[Any], *, none: bool = False) -> Any:
    """``value`` if it is one of ``choices`` (or None when ``none``); else ValueError (InvalidType for a value of
    another type than the choices) naming ``name`` and the choices."""
    choices = tuple(choices)
    if (value is None and none) or (not isinstance(value, (list, dict, set)) and value in choices):
        return value
    listed = ", ".join(repr(c) for c in choices) + (" or None" if none else "")
    kinds = {type(c) for c in choices}
    error = InvalidType if kinds and not isinstance(value, tuple(kinds)) else ValueError
    raise error(f"{name}={_describe(value)}: must be one of {listed}.")


def check_text(name: str, value: Any, *, none: bool = False, path: bool = False) -> Any:
    """``value`` if it is a non-empty string (or a path when ``path``; None when ``none``), else InvalidType /
    ValueError naming ``name``."""
    if value is None and none:
        return None
    kinds = (str, os.PathLike) if path else (str,)
    allowed = ("a path" if path else "a string") + (" or None" if none else "")
    if not isinstance(value, kinds):
        raise InvalidType(f"{name}={_describe(value)}: must be {allowed}.")
    if not str(os.fspath(value) if path else value).strip():
        raise ValueError(f"{name}={value!r}: must be a non-empty {'path' if path else 'string'}.")
    return value


def check_device(device: Any, name: str = "device") -> Any:
    """Refuse a device torch cannot parse, or one this machine does not have (CUDA or MPS absent, a CUDA index past
    the last GPU), naming ``name`` and what there is. Returns ``device`` unchanged."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise InvalidType(f"{name}={_describe(device)}: must be a device name such as 'cpu', 'cuda' or 'cuda:1'.")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={str(device)!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r}: CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False); use 'cpu'.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name}={str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}.")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{name}={str(device)!r}: MPS is not available on this machine; use 'cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"{name}={str(device)!r}: gfenv runs on 'cpu', 'cuda' (or 'cuda:N') and 'mps'.")
    return device


def check_output(path: str | os.PathLike, flag: str, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: ``path`` (a file, or a folder when ``folder``) must
    not be the other kind, every part of it that exists must be a folder, and the deepest existing folder must
    accept a new file (probed by creating and removing one, so read-only file systems are caught even as root).
    Creates nothing that stays; returns ``path`` as a Path."""
    out = Path(path).expanduser()
    if str(path).strip() == "":
        raise ValueError(f"{flag}: an empty path; give a {'folder' if folder else 'file'} path.")
    if out.exists():
        if folder and not out.is_dir():
            raise ValueError(f"{flag} {out} is a file, not a folder; give a folder path (or delete the file).")
        if not folder and out.is_dir():
            raise ValueError(f"{flag} {out} is a folder; give a file path inside it, e.g. {out / 'results'}.")
    probe_dir = out if folder and out.is_dir() else out.parent
    existing = probe_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {out}: {existing} is a file, so no folder can be made there.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gfenv-probe-", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"{flag} {out} cannot be written: {existing} does not accept new files "
                         f"({err.strerror or err}).") from None
    if out.is_file() and not os.access(out, os.W_OK):
        raise ValueError(f"{flag} {out} cannot be written: the file is read-only.")
    return out


def check_fields(obj: Any, what: str, limits: dict[str, dict[str, Any]] | None = None) -> None:
    """Check every field of dataclass ``obj`` against its annotation (int, float, bool, str, dict, list, and
    ``X | None``) and ``limits`` (field -> ``check_int``/``check_float`` keyword arguments, or ``choices``); a bad
    value raises InvalidType/ValueError naming the field, the value and what is allowed (``what`` says whose
    setting it is). Whole floats given for an int field are stored as ints."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    limits = limits or {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name, Any)
        args = typing.get_args(hint)
        optional = type(None) in args
        kinds = [a for a in args if a is not type(None)] or [hint]
        rule = dict(limits.get(f.name, {}))
        name = f"{what} {f.name}" if what else f.name
        if "choices" in rule:
            setattr(obj, f.name, check_choice(name, value, rule["choices"], none=optional))
            continue
        kind = kinds[0] if len(kinds) == 1 else None
        if kind is bool:
            if not (optional and value is None):
                check_bool(name, value)
        elif kind is int:
            setattr(obj, f.name, check_int(name, value, none=optional, **rule))
        elif kind is float:
            setattr(obj, f.name, check_float(name, value, none=optional, **rule))
        elif kind is str:
            check_text(name, value, none=optional)
        elif kind in (dict, list) and not (optional and value is None) and not isinstance(value, kind):
            raise InvalidType(f"{name}={_describe(value)}: must be a {kind.__name__}.")


def argument(kind: str, low: float | None = None, high: float | None = None, above: float | None = None):
    """An argparse ``type=`` that checks the range as it parses: ``argument("int", low=1)`` refuses ``0``, ``-5`` and
    ``abc`` with the value and what is allowed (argparse names the flag, prints one error line and exits 2)."""
    import argparse

    bounds = _bounds(low, high, above)
    allowed = ("an integer" if kind == "int" else "a finite number") + (f" {bounds}" if bounds else "")

    def parse(text: str):
        try:
            number: Any = int(text) if kind == "int" else float(text)
            if kind == "int":
                check_int("", number, low, high)
            else:
                check_float("", number, low, high, above=above)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {allowed}") from None
        return number

    parse.__name__ = allowed
    return parse


def import_modules(names: list[str] | None) -> None:
    """Import the user's modules named by ``--import`` (their register_* calls add rewards, datasets, agents,
    tasks or backbones before the command reads its arguments); ValueError naming the module that fails."""
    import importlib

    for name in names or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"--import {name}: cannot import it ({err}); give a module on the Python path, e.g. "
                             f"my_extensions for ./my_extensions.py.") from err
