"""`moe-energy selfcheck`: does this host's install, energy metering and MoE kernels work? (minutes)"""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from ..storage.results import check_writable, stamp
from . import command, console, save_then_show
from .options import device_of

STYLE = {"ok": "green", "FAIL": "bold red", "info": "dim", "skip": "yellow"}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: cuda > mps > cpu)")
    p.add_argument("--out", default="results", help="directory for the JSON report")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of each energy window (dense, MoE)")
    p.add_argument("--idle-seconds", type=float, default=3.0, dest="idle_seconds",
                   help="seconds of the idle-power window (0 skips it)")


def _seconds(flag: str, v: float, zero_ok: bool) -> None:
    """A one-line ConfigError for a duration that is not a finite number of seconds in range."""
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok) or v > 3600:
        raise ConfigError(f"{flag} {v} must be a number of seconds {'>= 0' if zero_ok else '> 0'} and <= 3600")


@command("selfcheck", "Check this host in minutes: meters, every MoE strategy's output, energy windows, idle "
         "power, trace vs counter; prints a verdict and writes JSON (exit 0 only if all passed).", _args)
def selfcheck(args: argparse.Namespace) -> int:
    """Check the flags, run every check, print the table and the verdict, save the JSON; exit 1 on any FAIL."""
    device = device_of(args.device)  # the check run makes: a name it knows, of a device that is here
    _seconds("--seconds", args.seconds, zero_ok=False)
    _seconds("--idle-seconds", args.idle_seconds, zero_ok=True)
    check_writable(args.out)
    from ..bench.selfcheck import run_selfcheck

    with console.status("self-check") as status:
        report = run_selfcheck(device, args.seconds, args.idle_seconds,
                               on_phase=lambda msg: status.update(f"self-check: {escape(msg)}"))
    doc = report.as_doc()
    code = save_then_show(doc, args.out, f"selfcheck-{device.type}-{stamp(doc)}", lambda: console.print(_table(report)),
                          what="report")
    if code:
        return code
    console.print(escape(report.verdict), style="bold green" if report.passed else "bold red", highlight=False)
    return 0 if report.passed else 1


def _table(report: Any) -> Table:
    """One row a check; every text escaped (details quote error messages and paths)."""
    env = report.environment
    t = Table(title=escape(f"moe-energy selfcheck on {env['device_name']} ({report.device}, "
                           f"torch {env['torch']}; {report.elapsed_s:.0f} s)"))
    for col in ("group", "check", "result", "detail"):
        t.add_column(col)
    for c in report.checks:
        t.add_row(escape(c.group), escape(c.name), f"[{STYLE[c.status]}]{escape(c.status)}[/]", escape(c.detail))
    return t
