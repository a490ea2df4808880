"""`moe-energy run` (every workload, one process or an expert-parallel job) and `moe-energy presets`.

One path: the flags resolve to a workload (the seed's classifiers, or with --arch an LLM layer) and its options;
one process runs it under any power caps (``power.capped``), a torchrun job (``--parallel expert``) on every rank
(``distributed.job``, rank 0 saves); the document is saved before anything is printed, then the one results
table (``tables``) shows it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.table import Table

from ..config import PRESETS, RunOptions
from ..device import resolve_device
from ..distributed.group import check_divisible, init_group, launch_env, shutdown
from ..distributed.job import check_options, run_job
from ..energy.meter import Meter
from ..models.counting import moe_active_params, moe_params
from ..models.dense import dense_width
from ..power.capped import run_and_save
from ..power.carbon import add_carbon
from ..runner.core import Team, Workload, check_dtype
from ..runner.core import run as run_workload
from ..storage.results import check_writable, run_stem, save_or_rescue
from . import command, console, measured, notice
from .options import (
    add_energy_arguments,
    add_forward_limit,
    add_llm_arguments,
    add_model_arguments,
    add_parallel_arguments,
    add_power_arguments,
    add_run_arguments,
    add_shape_arguments,
    collective_timeout,
    meter_from_args,
    resolve_power,
    resolve_workload,
)
from .power import check_power, refuse_for_parallel, restore_status
from .tables import print_results
from .ui import RichUI

SMALLER = {"seed": "a smaller shape or batch size", "llm_layer": "a smaller arch or fewer --tokens",
           "whole_model": "fewer --layers, or a smaller --batch or --context"}


def _run_args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_run_arguments(p)
    add_energy_arguments(p)
    add_power_arguments(p)
    add_parallel_arguments(p)
    add_llm_arguments(p)  # after add_shape_arguments: reuses its --experts/--top-k
    add_model_arguments(p)
    add_forward_limit(p)


@command("run", "Train the MoE and its matched dense models, measure each, print the table, save JSON "
         "(--arch: an LLM MoE layer per token count; --model: whole LLMs, prefill and decode; no training).",
         _run_args)
def run(args: argparse.Namespace) -> int:
    w, opts = resolve_workload(args)
    caps, carbon = resolve_power(args)
    timeout_s = collective_timeout(args)
    if args.parallel == "expert":
        refuse_for_parallel(caps)
        done = measured(_job(args, w, opts, carbon, timeout_s), print_results)
        return done if isinstance(done, int) else _exit_status(done[0], w, parallel=True)
    check_writable(opts.out)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies if w.trains else ())
    w.check(opts, device, opts.strategies)  # before the meter's notice: a refusal is one line, as plan's is
    meter = meter_from_args(args, device, notice=notice)
    plan = check_power(caps, meter, device)  # before any work: a cap the hardware refuses is exit 2 now
    meter = plan.wrap(meter)

    def job() -> tuple[dict, Path]:
        def body() -> dict:
            doc, _ = run_workload(w, opts, Team(meter), RichUI(console), save=False)
            assert doc is not None
            return doc

        return run_and_save(plan, carbon, body, opts.out, lambda d: run_stem(d, w.stem()))

    done = measured(job, print_results)
    if isinstance(done, int):
        return done
    return restore_status(plan) or _exit_status(done[0], w, parallel=False)


def _job(args: argparse.Namespace, w: Workload, opts: RunOptions, carbon: object, timeout_s: float):  # noqa: ANN202
    """Every rank: the flags' checks before any rendezvous (each rank alike), then the job; rank 0 prices and
    saves its document, every other rank returns (None, None). A lost peer raises PeerLost (exit 3).

    --out is rank 0's alone: it is checked on rank 0 in the start-up agreement (every rank then refuses alike),
    not here, where another rank's machine (which may lack the path) would fail alone and leave its peers
    waiting at the rendezvous."""
    check_options(opts)  # --compile, --moe-strategy: refused alike on every rank, before any rendezvous
    _, world, _ = launch_env()
    check_divisible(w.experts, world)  # before any rendezvous: every rank fails alike, none waits

    def job() -> tuple[dict | None, Path | None]:
        g = init_group(opts.device, timeout_s)

        def meters(dev: torch.device) -> Meter:
            """This rank's meter over its own devices; --meter / --cpu-tdp-watts apply where run has them."""
            return meter_from_args(args, dev, notice=_log if g.is_main else None)

        try:
            doc, _ = run_job(w, opts, g, meters, ui=RichUI(console) if g.is_main else None, log=_log, save=False,
                             check_out=True)
        finally:
            shutdown()
        if doc is None:
            return None, None
        add_carbon(doc, carbon)  # type: ignore[arg-type]
        return doc, save_or_rescue(doc, opts.out, run_stem(doc, w.stem(), f"-ep{world}"))

    return job


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _exit_status(doc: dict | None, w: Workload, parallel: bool) -> int:
    """1 (with one line) when nothing was measured or every window failed; 0 otherwise (and on other ranks)."""
    if doc is None:
        return 0
    measured_rows = [m for m in doc["models"] if m.get("status") == "measured"]
    if not measured_rows:
        where = ": each was skipped on at least one rank (reasons above)" if parallel else " (see the reasons above)"
        print(f"error: no model was measured{where}; choose {SMALLER[w.family or 'seed']}", file=sys.stderr)
        return 1
    if not any(m.get("repeats") for m in measured_rows):
        print("error: every measurement window failed (each window's reason is in the JSON); run 'moe-energy "
              "meters' to see what works here", file=sys.stderr)
        return 1
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
