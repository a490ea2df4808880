"""Entry point: parse, run a command, and turn every user mistake into one line and exit code 2.

Exit codes: 0 done; 1 the command ran but has no result (nothing measured, results not saved); 2 a mistake
in the input (``ConfigError``), or standard output that cannot be written (``> /dev/full``: one line
``error: cannot write to standard output (...)``, naming any results file already saved); 3 a peer of a
distributed job was lost (``PeerLost``: a rank died, hung or became unreachable; not the user's mistake);
128 + N a signal (130 Ctrl-C, 143 SIGTERM), at any moment, start-up imports included; 141 (128 + SIGPIPE) the
reader of standard output went away (``| head``): no message, as a C tool killed by SIGPIPE ends. A command
whose own status is not 0 keeps it when its output is lost too.

Standard output is guarded for every command (``commands.guarded_streams``): the first failed write raises
``StdoutLost`` from every later one, which ends the command like Ctrl-C (``finally`` blocks run, nothing is
recorded as a failed measurement); results written before that stay written, and `run` (whose progress bars
ignore it, commands.ui) still measures and saves before it prints. A failing standard error is dropped
silently: there is nowhere left to tell.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import sys

from .errors import ConfigError, PeerLost, one_line
from .interrupts import exit_code, signal_name, signals_raise

# Each module registers its commands in commands.COMMANDS; add a module here to add its commands.
COMMAND_MODULES = ["run", "plan", "meters", "sweep", "strategies", "selfcheck", "archs"]
EXIT_PEER_LOST = 3  # another rank of a distributed job is gone: its own code, not a user mistake (2)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: the reader of standard output went away


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


def _say(line: str) -> None:
    """One line on standard error; a standard error that cannot take it is not a second failure."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _dispatch(argv: list[str] | None) -> int:
    """Build the parser, parse and run the command: its exit code, every expected failure as one line."""
    try:
        parser = build_parser()  # imports torch and every command: Ctrl-C here is caught below
        args = parser.parse_args(argv)
        if getattr(args, "_handler", None) is None:
            parser.print_help()
            return 2
        with signals_raise():  # SIGTERM and SIGHUP unwind every command like Ctrl-C: its cleanup runs
            return int(args._handler(args) or 0)
    except SystemExit as e:  # --help, --version: argparse exits; the output is still flushed by the caller
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except ConfigError as e:
        _say(f"error: {e}")
        return 2
    except PeerLost as e:
        _say(f"error: {e}")
        return EXIT_PEER_LOST


def _lost_output(lost: OSError, code: int) -> int:
    """The status (and one line, unless the reader just went away) for a standard output that failed."""
    if isinstance(lost, BrokenPipeError) or lost.errno == errno.EPIPE:
        return code or EXIT_PIPE_CLOSED
    from .commands import SAVED

    saved = f"; results saved to {', '.join(map(str, SAVED))}" if SAVED else ""
    _say(f"error: cannot write to standard output ({lost.strerror or one_line(lost)}){saved}")
    return code or 2


def _guarded(argv: list[str] | None) -> int:
    """``_dispatch`` with standard output guarded (``StdoutLost``) and flushed before the streams go back."""
    from .commands import StdoutLost, guarded_streams

    with guarded_streams() as out:
        try:
            code = _dispatch(argv)
            if out is not None:
                out.flush()
        except StdoutLost:
            code = 0
        lost = out.lost if out is not None else None
    return code if lost is None else _lost_output(lost, code)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exits with the status (returns it when ``argv`` is given, for tests)."""
    try:
        code = _guarded(argv)
    except KeyboardInterrupt as e:  # anywhere: the imports, parsing, a command, even reporting an error
        code = exit_code(e)
        _say("interrupted" if code == EXIT_INTERRUPTED else f"interrupted ({signal_name(e)})")
    if argv is None:
        sys.exit(code)
    return code
