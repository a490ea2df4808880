"""`moe-energy run --parallel expert`: the run spread over torchrun's ranks (see the distributed package).

``add_parallel_arguments`` joins run's flags; run's handler hands over to ``run_parallel`` when
``--parallel expert`` is given. Every rank runs this; rank 0 prints the table and writes the JSON.
--repeats, --idle-seconds and --cooldown work as in a single-process run; --compile is refused (exit 2)
before any rank waits for another.
"""

from __future__ import annotations

import argparse
import sys

import torch
from rich.markup import escape
from rich.table import Table

from ..distributed import (
    DEFAULT_TIMEOUT_S,
    check_divisible,
    check_options,
    init_group,
    launch_env,
    run_distributed,
    shutdown,
)
from ..energy.meter import Meter
from . import console, fmt, record_saved
from .options import meter_from_args, resolve
from .ui import RichUI


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (launch every rank with torchrun)")
    g.add_argument("--parallel", choices=("none", "expert"), default="none",
                   help="expert: shard the experts over torchrun's ranks (all-to-all), dense baselines "
                        "data-parallel on the same ranks")
    g.add_argument("--collective-timeout", type=float, dest="collective_timeout", default=DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="a rank waiting longer than this on another (dead or hung) exits "
                                           "with a message and status 3")


def parallel_table(doc: dict) -> Table:
    """One row a model: the job's medians over its windows, per-rank joules and the all-to-all's share."""
    par = doc["parallel"]
    reps = max((m.get("repeats", 1) for m in doc["models"]), default=1)
    t = Table(title=escape(f"moe-energy expert-parallel results ({par['world_size']} ranks, {par['backend']}, "
                           f"{par['nodes']} node(s), {doc['options']['dtype']}; median of {reps} window(s) per model)"))
    for col in ("model", "params", "held-out acc", "inferences/s", "inferences/J", "energy J (per rank)",
                "energy method", "all-to-all s (share)", "all-to-all MB", "p50 ms/batch"):
        t.add_column(col, justify="left" if col in ("model", "energy method", "energy J (per rank)") else "right")
    for m in doc["models"]:
        if m.get("skipped"):
            t.add_row(escape(m["name"]), f"{m['params']:,}", "-", escape("skipped: " + m["skipped"]),
                      *["-"] * 6)
            continue
        p = m["parallel"]
        per_rank = " + ".join(fmt(j, ",.1f") for j in p["per_rank_joules"])
        a2a = (f"{p['all_to_all_seconds']:.3f} ({p['all_to_all_share_of_window']:.0%})"
               if "all_to_all_seconds" in p else "none (data-parallel)")
        mb = fmt(p["all_to_all_bytes"] / 1e6, ",.2f") if "all_to_all_bytes" in p else "-"
        t.add_row(escape(m["name"]), f"{m['params']:,}", fmt(m["accuracy"], ".1%"),
                  fmt(m["inferences_per_second"]), fmt(m["inferences_per_joule"], ",.1f"),
                  f"{fmt(m['energy_j'], ',.1f')} ({per_rank})", escape(m["energy_method"]), a2a, mb,
                  fmt(m["latency_p50_ms"], ".3f"))
    return t


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report(doc: dict, path: object) -> int:
    """Rank 0: the table, run's lines on energy, idle power and skips; 1 when no model was measured."""
    from .run import energy_summary  # run imports this module: imported here, when both are loaded

    record_saved(str(path))  # written before anything is printed: a stdout that fails now loses nothing
    console.print(parallel_table(doc))
    console.print(escape("\n".join(energy_summary(doc))), highlight=False, soft_wrap=True)
    console.print(f"results written to {escape(str(path))}", highlight=False, soft_wrap=True)
    if any(m.get("status") == "measured" for m in doc["models"]):
        return 0
    print("error: no model was measured: each was skipped on at least one rank (reasons above); choose a "
          "smaller shape or batch size", file=sys.stderr)
    return 1


def run_parallel(args: argparse.Namespace) -> int:
    """Every rank: join the job, run, leave; rank 0 prints and saves.

    User mistakes raise ConfigError (exit 2), all before training; a lost peer raises PeerLost (exit 3).
    """
    spec, opts = resolve(args)
    check_options(opts)  # --compile, --moe-strategy: refused alike on every rank, before any rendezvous
    _, world, _ = launch_env()
    check_divisible(spec.experts, world)  # before any rendezvous: every rank fails alike, none waits
    g = init_group(opts.device, args.collective_timeout)

    def meters(dev: torch.device) -> Meter:
        """This rank's meter over its own devices; --meter / --cpu-tdp-watts apply where run has them."""
        return meter_from_args(args, dev, notice=_log if g.is_main else None)

    try:
        doc, path = run_distributed(spec, opts, g, meters, ui=RichUI(console) if g.is_main else None, log=_log)
    finally:
        shutdown()
    return 0 if doc is None else _report(doc, path)
