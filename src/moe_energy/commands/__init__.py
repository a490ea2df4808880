"""The CLI's commands. Each module registers its own with ``@command``; cli.py imports them all.

A command is two functions: ``add_arguments(parser)`` and ``handler(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

# Piped output (CI logs, files) gets a wide console so tables keep whole numbers instead of '…'.
console = Console() if sys.stdout.isatty() else Console(width=max(160, shutil.get_terminal_size().columns))
err_console = Console(stderr=True)


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``handler`` as ``moe-energy NAME``."""

    def deco(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, add_arguments, handler)
        return handler

    return deco


from ..config import split_list  # noqa: E402,F401 - the commands' comma-list parser lives with the options


def fmt(v: float | int | None, spec: str = ",.0f", unit: str = "") -> str:
    """A figure for a table: 'not measured' rather than 0, inf or NaN."""
    if v is None:
        return "not measured"
    return f"{v:{spec}}{unit}"
