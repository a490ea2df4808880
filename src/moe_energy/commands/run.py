"""`moe-energy run` and `moe-energy presets`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..capped import run_and_save
from ..carbon import unit
from ..config import PRESETS
from ..device import resolve_device
from ..models.counting import moe_active_params, moe_params
from ..models.dense import dense_width
from ..pipeline import check_dtype
from ..pipeline import run as run_models
from ..results import check_writable, run_stem
from . import command, console, err_console, fmt, measured
from .llm import add_forward_limit, add_llm_arguments, refuse_llm_only, run_llm_command
from .options import (
    add_energy_arguments,
    add_power_arguments,
    add_run_arguments,
    add_shape_arguments,
    declared_shape,
    meter_from_args,
    resolve,
    resolve_power,
)
from .parallel import add_parallel_arguments, run_parallel
from .power import check_power, power_columns, power_lines, refuse_for_parallel, restore_status
from .ui import RichUI


def _spread(m: dict, key: str, spec: str) -> str:
    """'median [min-max]' when the repeats differ, else the median alone; 'not measured' for None."""
    med, lo, hi = m.get(key), m.get(f"{key}_min"), m.get(f"{key}_max")
    if med is None:
        return "not measured"
    if lo is None or hi is None or m.get("repeats", 1) < 2:
        return fmt(med, spec)
    return f"{fmt(med, spec)} [{_si(lo)}-{_si(hi)}]"


def _si(v: float) -> str:
    """3 significant digits with a k/M/G suffix: keeps a min-max range narrow enough for the table."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _not_measured(m: dict) -> str:
    """Why a model has no figures: 'skipped: <reason>' (it could not fit) or 'failed: <error>' (it broke)."""
    return m["skipped"] if m.get("status") == "failed" else f"skipped: {m['skipped']}"


def results_table(doc: dict) -> Table:
    env = doc["environment"]
    reps = max((m.get("repeats", 1) for m in doc["models"]), default=1)
    t = Table(title=escape(f"moe-energy results ({env['device_name']}, {doc['options']['dtype']}; "
                           f"median [min-max] of {reps} window(s) per model)"))
    extra = power_columns(doc)
    for col in ("model", "params", "active params", "train acc", "held-out acc", "inferences/s", "inferences/J",
                "dynamic inferences/J", "avg W", "energy method", "p50 ms/batch", *[h for h, _ in extra]):
        # fold, never '…': a truncated range would hide the very figure the table is for
        t.add_column(escape(col), justify="left" if col in ("model", "energy method") else "right",
                     overflow="fold")
    for m in doc["models"]:
        if m.get("skipped"):
            t.add_row(escape(m["name"]), f"{m['params']:,}", f"{m['active_params']:,}", "-", "-",
                      escape(_not_measured(m).split(" (")[0]), "-", "-", "-", "-", "-", *["-"] * len(extra))
            continue
        est = " (estimate)" if m.get("energy_is_estimate") or m["energy_method"] == "estimate" else ""
        acc = fmt(m["accuracy"], ".1%") + (" (diverged: meaningless)" if m["diverged"] else "")
        ipj = _spread(m, "inferences_per_joule", ",.1f")
        dipj = _spread(m, "dynamic_inferences_per_joule", ",.1f")
        watts = m["average_power_w"]
        t.add_row(
            escape(m["name"]), f"{m['params']:,}", f"{m['active_params']:,}",
            fmt((m["train"]["epoch_train_accuracy"] or [None])[-1], ".1%"), acc,
            escape(_spread(m, "inferences_per_second", ",.0f")),
            escape(ipj) + (est if m["inferences_per_joule"] is not None else ""),
            escape(dipj) + (est if m.get("dynamic_inferences_per_joule") is not None else ""),
            fmt(watts, ".1f") + (est if watts is not None else ""),
            escape(m["energy_method"]),
            fmt(m["latency_p50_ms"], ".3f"),
            *[escape(cell(m)) for _, cell in extra],
        )
    return t


def energy_summary(doc: dict) -> list[str]:
    """Lines under the table: which meter, the idle power, and how many windows carry warnings."""
    meter = doc.get("energy_meter") or {}
    lines = [f"energy: meter {meter.get('name')} ({meter.get('method')}), devices "
             f"{', '.join(meter.get('devices') or []) or 'none'}"]
    if meter.get("method") == "estimate":
        lines[0] += " -- ESTIMATE, not a measurement; do not compare with measured figures"
    idle = doc.get("idle")
    if idle and idle.get("power_w") is not None:
        lines.append(f"idle power: {idle['power_w']:.2f} W ({meter.get('method')}) over {idle['seconds']:.1f} s "
                     "(dynamic = raw minus idle power x window seconds)")
    else:
        lines.append(f"idle power: not measured (dynamic {unit(doc)}/J needs --idle-seconds > 0)")
    flagged = sum(1 for m in doc["models"] for w in m.get("windows", []) if w.get("flags"))
    total = sum(len(m.get("windows", [])) for m in doc["models"])
    if flagged:
        lines.append(f"{flagged} of {total} windows carry warnings (see 'flags' in the JSON)")
    failed = sum(1 for m in doc["models"] for w in m.get("windows", []) if w.get("failed"))
    if failed:
        first = next(w["failed"] for m in doc["models"] for w in m.get("windows", []) if w.get("failed"))
        lines.append(f"{failed} of {total} windows FAILED and were left out of the figures: {first}")
    if isinstance(idle, dict) and idle.get("failed"):
        lines[1] = f"idle power: not measured ({idle['failed']})"
    lines += power_lines(doc)
    lines += [f"notice: {n}" for n in doc.get("notices", [])]
    for m in doc["models"]:
        if m.get("skipped"):
            lines.append(f"{m['name']}: {_not_measured(m).replace('skipped: ', 'skipped, ', 1)}")
        elif m.get("diverged"):
            reason = (m.get("train") or {}).get("diverged_reason")
            lines.append(f"{m['name']}: training diverged ({reason}); its accuracy is meaningless, its speed and "
                         "energy are valid")
    return lines


def _run_args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_run_arguments(p)
    add_energy_arguments(p)
    add_power_arguments(p)
    add_parallel_arguments(p)
    add_llm_arguments(p)  # after add_shape_arguments: reuses its --experts/--top-k
    add_forward_limit(p)


@command("run", "Train the MoE and its matched dense models, measure each, print the table, save JSON "
         "(--arch: an LLM MoE layer per token count, no training).",
         _run_args)
def run(args: argparse.Namespace) -> int:
    if args.arch is None:
        refuse_llm_only(args)
    if args.parallel == "expert":  # the seed's models, or with --arch an LLM layer: run_parallel runs both
        refuse_for_parallel(resolve_power(args)[0])
        return run_parallel(args)
    if args.arch is not None:
        return run_llm_command(args)
    caps, carbon = resolve_power(args)
    spec, opts = resolve(args)
    check_writable(opts.out)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies)
    if opts.data:
        opts = replace(opts, extra={**opts.extra, "declared_shape": declared_shape(args)})
    meter = meter_from_args(args, device, notice=lambda msg: err_console.print(f"notice: {escape(msg)}",
                                                                               highlight=False, soft_wrap=True))
    plan = check_power(caps, meter, device)  # before training: a cap the GPU refuses is exit 2 now
    meter = plan.wrap(meter)


    def job() -> tuple[dict, Path]:
        body = lambda: run_models(spec, opts, meter, RichUI(console), save=False)[0]  # noqa: E731
        return run_and_save(plan, carbon, body, opts.out, lambda d: run_stem(d, opts.extra.get("preset")))

    done = measured(job, _print_results)
    if isinstance(done, int):
        return done
    doc, _path = done
    if restore_status(plan):
        return 1
    if not any(m.get("status") == "measured" for m in doc["models"]):
        print("error: no model was measured (see the skip reasons above); choose a smaller shape or batch size",
              file=sys.stderr)
        return 1
    if not any(m.get("repeats") for m in doc["models"] if m.get("status") == "measured"):
        print("error: every measurement window failed (each window's reason is in the JSON); run 'moe-energy "
              "meters' to see what works here", file=sys.stderr)
        return 1
    return 0


def _print_results(doc: dict) -> None:
    console.print(results_table(doc))
    for line in energy_summary(doc):
        console.print(escape(line), highlight=False, soft_wrap=True)


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
