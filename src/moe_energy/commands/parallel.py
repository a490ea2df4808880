"""`moe-energy run --parallel expert`: the run spread over torchrun's ranks (see the distributed package).

``add_parallel_arguments`` joins run's flags; run's handler hands over to ``run_parallel`` when
``--parallel expert`` is given, with or without ``--arch`` (the seed's trained models, or an LLM layer per
token count: ``--tokens T`` is each rank's tokens per forward). Every rank runs this; rank 0 prices the records
(--carbon-intensity, --price-per-kwh: ``carbon.add_carbon``, as `run` does), prints the table and writes the
JSON. --repeats, --idle-seconds and --cooldown work as in a single-process run; --compile, a
--moe-strategy other than grouped or auto, experts that do not split over the ranks and run's own bad flags
are refused (exit 2, one line) before any rank waits for another.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from ..carbon import add_carbon
from ..config import RunOptions
from ..distributed import (
    DEFAULT_TIMEOUT_S,
    check_divisible,
    check_options,
    init_group,
    launch_env,
    run_distributed,
    run_layer_job,
    shutdown,
)
from ..energy.meter import Meter
from ..results import NotSaved, check_writable, run_stem, save_or_rescue
from . import console, fmt, record_saved
from .llm import resolve_llm
from .options import meter_from_args, resolve, resolve_power
from .power import power_columns
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
    extra = power_columns(doc)
    for col in ("model", "params", "held-out acc", "inferences/s", "inferences/J", "energy J (per rank)",
                "energy method", "all-to-all s (share)", "all-to-all MB", "p50 ms/batch", *[h for h, _ in extra]):
        t.add_column(escape(col), justify="left" if col in ("model", "energy method", "energy J (per rank)")
                     else "right", overflow="fold")
    for m in doc["models"]:
        if m.get("skipped"):
            t.add_row(escape(m["name"]), f"{m['params']:,}", "-", escape("skipped: " + m["skipped"]),
                      *["-"] * (6 + len(extra)))
            continue
        energy, a2a, mb = _parallel_cells(m)
        t.add_row(escape(m["name"]), f"{m['params']:,}", fmt(m["accuracy"], ".1%"),
                  fmt(m["inferences_per_second"]), fmt(m["inferences_per_joule"], ",.1f"), energy,
                  escape(m["energy_method"]), a2a, mb, fmt(m["latency_p50_ms"], ".3f"),
                  *[escape(cell(m)) for _, cell in extra])
    return t


def _parallel_cells(m: dict) -> tuple[str, str, str]:
    """A measured row's job energy with each rank's share, the all-to-all's seconds (share), its MB."""
    p = m["parallel"]
    per_rank = " + ".join(fmt(j, ",.1f") for j in p["per_rank_joules"])
    a2a = (f"{p['all_to_all_seconds']:.3f} ({p['all_to_all_share_of_window']:.0%})"
           if "all_to_all_seconds" in p else "none (data-parallel)")
    mb = fmt(p["all_to_all_bytes"] / 1e6, ",.2f") if "all_to_all_bytes" in p else "-"
    return f"{fmt(m['energy_j'], ',.1f')} ({per_rank})", a2a, mb


def parallel_layer_table(doc: dict) -> Table:
    """One row per (model, token count) of an LLM layer's job: per-token figures, per-rank joules, all-to-all."""
    par, arch = doc["parallel"], doc["arch"]
    reps = max((m.get("repeats", 1) for m in doc["models"]), default=1)
    t = Table(title=escape(f"moe-energy {arch['name']}: one layer expert-parallel ({par['world_size']} ranks, "
                           f"{par['backend']}, {par['nodes']} node(s), {doc['options']['dtype']}, routing "
                           f"{doc['routing']['mode']}; T tokens per rank per forward; median of {reps} window(s))"))
    extra = power_columns(doc)
    for col in ("model", "T", "tokens/s", "tokens/J", "J/1k tokens", "energy J (per rank)", "energy method",
                "experts touched", "all-to-all s (share)", "all-to-all MB", "p50 ms", *[h for h, _ in extra]):
        t.add_column(escape(col), justify="left" if col in ("model", "energy method", "energy J (per rank)")
                     else "right", overflow="fold")
    for m in doc["models"]:
        name, T = escape(m["name"].split("@")[0]), str(m["tokens_per_forward"])
        if m.get("skipped"):
            t.add_row(name, T, escape("skipped: " + m["skipped"]), *["-"] * (8 + len(extra)))
            continue
        energy, a2a, mb = _parallel_cells(m)
        touched = "all weights" if m.get("kind") != "moe" else \
            "-" if m.get("experts_touched") is None else f"{m['experts_touched']:g} of {arch['experts']}"
        t.add_row(name, T, fmt(m["tokens_per_second"], ",.1f"), fmt(m["tokens_per_joule"], ",.2f"),
                  fmt(m["joules_per_1k_tokens"], ",.3f"), energy, escape(m["energy_method"]), touched, a2a, mb,
                  fmt(m["latency_p50_ms"], ".3f"), *[escape(cell(m)) for _, cell in extra])
    return t


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report(doc: dict, path: object) -> int:
    """Rank 0: the table, run's lines on energy, idle power and skips; 1 when no model was measured."""
    from .run import energy_summary  # run imports this module: imported here, when both are loaded

    record_saved(str(path))  # written before anything is printed: a stdout that fails now loses nothing
    console.print(parallel_layer_table(doc) if doc.get("family") == "llm_layer" else parallel_table(doc))
    console.print(escape("\n".join(energy_summary(doc))), highlight=False, soft_wrap=True)
    console.print(f"results written to {escape(str(path))}", highlight=False, soft_wrap=True)
    if any(m.get("status") == "measured" for m in doc["models"]):
        return 0
    llm = doc.get("family") == "llm_layer"
    smaller = "a smaller arch or fewer --tokens" if llm else "a smaller shape or batch size"
    print(f"error: no model was measured: each was skipped on at least one rank (reasons above); choose {smaller}",
          file=sys.stderr)
    return 1


def run_parallel(args: argparse.Namespace) -> int:
    """Every rank: check the flags, join the job, run, leave; rank 0 prices, prints and saves. ``--arch``: an LLM
    layer's job (``run_layer_job``), else the seed's (``run_distributed``).

    User mistakes raise ConfigError (exit 2): the flags' before any rendezvous, what only the device can tell
    before any model is built, on every rank alike; a lost peer raises PeerLost (exit 3).
    """
    carbon = resolve_power(args)[1]
    job, opts, experts, stem = _job_of(args)
    check_options(opts)  # --compile, --moe-strategy: refused alike on every rank, before any rendezvous
    _, world, _ = launch_env()
    check_divisible(experts, world)  # before any rendezvous: every rank fails alike, none waits
    check_writable(opts.out)  # the job saves nothing itself (rank 0 adds carbon first): checked here, on every rank
    g = init_group(opts.device, args.collective_timeout)

    def meters(dev: torch.device) -> Meter:
        """This rank's meter over its own devices; --meter / --cpu-tdp-watts apply where run has them."""
        return meter_from_args(args, dev, notice=_log if g.is_main else None)

    ui = RichUI(console) if g.is_main else None
    try:
        doc, _ = job(g, meters, ui=ui, log=_log, save=False)
    finally:
        shutdown()
    if doc is None:
        return 0
    add_carbon(doc, carbon)
    try:
        path = save_or_rescue(doc, opts.out, stem(doc, world))
    except NotSaved as e:
        if e.rescue is not None:
            record_saved(str(e.rescue))
        print(f"error: {e}", file=sys.stderr)
        return 1
    return _report(doc, path)


def _job_of(args: argparse.Namespace) -> tuple[Callable[..., tuple[dict | None, Path | None]], RunOptions, int,
                                                Callable[[dict, int], str]]:
    """(the job the flags describe, waiting for its group and meters; its options; its expert count; its results'
    file stem), every flag checked as the single-process command checks it (--arch: run_llm's, the seed's flags
    refused)."""
    if getattr(args, "arch", None) is not None:
        from ..llm_pipeline import layer_stem

        arch, opts, tokens, routing = resolve_llm(args)
        return (partial(run_layer_job, arch, opts, tokens, routing), opts, arch.experts,
                lambda doc, world: run_stem(doc, layer_stem(arch.name), f"-ep{world}"))
    spec, opts = resolve(args)
    return (partial(run_distributed, spec, opts), opts, spec.experts,
            lambda doc, world: run_stem(doc, opts.extra.get("preset"), f"-ep{world}"))
