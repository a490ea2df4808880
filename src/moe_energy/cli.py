"""Entry point: parse, run a command, and turn every user mistake into one line and exit code 2.

Exit codes: 0 done; 1 the command ran but has no result (nothing measured, results not saved); 2 a mistake
in the input (``ConfigError``); 3 a peer of a distributed job was lost (``PeerLost``: a rank died, hung or
became unreachable; not the user's mistake); 128 + N a signal (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError
from .errors import PeerLost

# Each module registers its commands in commands.COMMANDS; add a module here to add its commands.
COMMAND_MODULES = ["run", "plan", "meters", "sweep", "strategies", "selfcheck"]
EXIT_PEER_LOST = 3  # another rank of a distributed job is gone: its own code, not a user mistake (2)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS

    for mod in COMMAND_MODULES:
        importlib.import_module(f"moe_energy.commands.{mod}")
    parser = _Parser(
        prog="moe-energy",
        description="Measure when a Mixture-of-Experts model really uses less energy per inference "
        "than a dense model of the same size.",
    )
    parser.add_argument("--version", action="version", version=f"moe-energy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for c in COMMANDS.values():
        # defaults are written into each flag's help text: argparse's own '(default: None)' would mislead
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        c.add_arguments(p)
        p.set_defaults(_handler=c.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exits with the status (returns it when ``argv`` is given, for tests)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "_handler", None) is None:
            parser.print_help()
            code = 2
        else:
            code = int(args._handler(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except PeerLost as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_PEER_LOST
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if argv is None:
        sys.exit(code)
    return code
