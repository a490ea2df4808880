"""`moe-energy run` and `moe-energy presets`."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from ..config import PRESETS
from ..energy.meter import NullMeter
from ..models.counting import moe_active_params, moe_params
from ..models.dense import dense_width
from ..results import check_writable
from ..runner import run as run_models
from . import command, console, fmt
from .options import add_run_arguments, add_shape_arguments, resolve
from .ui import RichUI


def results_table(doc: dict) -> Table:
    env = doc["environment"]
    t = Table(title=f"moe-energy results ({env['device_name']}, {doc['options']['dtype']})")
    for col in ("model", "params", "active params", "train acc", "held-out acc", "inferences/s", "inferences/J",
                "avg W", "energy method", "p50 ms/batch"):
        t.add_column(col, justify="left" if col in ("model", "energy method") else "right")
    for m in doc["models"]:
        est = " (estimate)" if m["energy_method"] == "estimate" else ""
        acc = fmt(m["accuracy"], ".1%") + (" (diverged)" if m["diverged"] else "")
        ipj, watts = m["inferences_per_joule"], m["average_power_w"]
        t.add_row(
            escape(m["name"]), f"{m['params']:,}", f"{m['active_params']:,}",
            fmt((m["train"]["epoch_train_accuracy"] or [None])[-1], ".1%"), acc,
            fmt(m["inferences_per_second"]),
            fmt(ipj, ",.1f") + (est if ipj is not None else ""),
            fmt(watts, ".1f") + (est if watts is not None else ""),
            m["energy_method"], fmt(m["latency_p50_ms"], ".3f"),
        )
    return t


def _run_args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_run_arguments(p)


@command("run", "Train the MoE and its matched dense models, measure each, print the table, save JSON.",
         _run_args)
def run(args: argparse.Namespace) -> int:
    spec, opts = resolve(args)
    check_writable(opts.out)
    meter = NullMeter("no energy meter wired into run yet")
    doc, path = run_models(spec, opts, meter, RichUI(console))
    console.print(results_table(doc))
    console.print(f"results written to {path}")
    return 0


@command("presets", "List the built-in shapes with exact parameter counts and matched dense widths.")
def presets(args: argparse.Namespace) -> int:
    t = Table(title="moe-energy presets (input 784, classes 10)")
    for col in ("preset", "E", "H", "L", "k", "MoE params", "active params", "dense width (total)",
                "dense width (active)"):
        t.add_column(col, justify="right")
    for name, s in PRESETS.items():
        t.add_row(name, str(s.experts), str(s.hidden), str(s.layers), str(s.top_k), f"{moe_params(s):,}",
                  f"{moe_active_params(s):,}", f"{dense_width(s, 'total'):,}", f"{dense_width(s, 'active'):,}")
    console.print(t)
    return 0
