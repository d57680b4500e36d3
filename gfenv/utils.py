"""Small helpers shared by the command lines and the library: glibc's freed-memory setting, key=value parsing."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

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


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'}; refuses an item without '='."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"Expected key=value, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


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
