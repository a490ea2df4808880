"""`moe-energy meters`: every energy meter, whether it works here, and why not."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from ..device import resolve_device
from ..energy.rapl import ENV_ROOT, powercap_root
from ..energy.select import auto_meter, survey
from . import command, console


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps: the run whose auto choice to show")
    p.add_argument("--cpu-tdp-watts", type=float, dest="cpu_tdp_watts", help="TDP the estimate meter would use")


@command("meters", "List each energy meter, available or not and why, and what --meter auto picks.", _args)
def meters(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    t = Table(title=escape(f"moe-energy meters (device {device}; powercap root {powercap_root()}, set {ENV_ROOT} "
                           "to move it)"))
    for col in ("meter", "available", "method", "devices", "why / notes"):
        t.add_column(col)
    for s in survey(device, args.cpu_tdp_watts):
        t.add_row(escape(s.name), "yes" if s.available else f"no ({s.kind})", escape(s.method or "-"),
                  escape(", ".join(s.devices) or "-"), escape(s.reason))
    console.print(t)
    auto = auto_meter(device, cpu_tdp_watts=args.cpu_tdp_watts)
    line = f"--meter auto picks: {auto.name} ({auto.method})"
    if getattr(auto, "notice", None):
        line += f"; {auto.notice}"
    console.print(escape(line), highlight=False, soft_wrap=True)  # one line: the reason is the news
    return 0
