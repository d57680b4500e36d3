"""The command lines (``train.py``, ``evaluate.py``, ``bench.py``) and what they share: how an error reaches the user.

A user error (a bad argument, a missing or unreadable file, an output that cannot be written, a device this machine
lacks, a missing optional package, running out of memory) prints one line, ``error: ...``, and the command exits 2;
Ctrl-C (and SIGTERM, where the command saves) exits 130. ``--debug`` or ``GFENV_DEBUG=1`` shows the full traceback
instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

DEBUG_VAR = "GFENV_DEBUG"


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--debug`` and ``--import``, which every command takes."""
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the full traceback instead of one line (also: {DEBUG_VAR}=1)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (its register_reward/dataset/agent/task/backbone calls); repeatable")


def debugging(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_VAR, "") not in ("", "0")


def describe(err: BaseException) -> str:
    """One line for an error: an OS error as its reason and file, others as their message."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        first = str(err).splitlines()[0] if str(err) else "out of memory"
        return (f"the device ran out of memory ({first}); use fewer slots (--num-envs), a smaller --batch-size, "
                f"or --low-memory.")
    if isinstance(err, OSError) and err.strerror:
        target = f": {err.filename}" if err.filename else ""
        second = f" -> {err.filename2}" if err.filename2 else ""
        return f"{err.strerror}{target}{second}"
    return str(err) or type(err).__name__


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``; a user error printed as one line (exit 2), Ctrl-C as exit 130, unless debugging."""
    import torch

    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ImportError, torch.OutOfMemoryError) as err:
        if debugging(args):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return 2
