"""`moe-energy plan`: validate a run's options and show what it would build, without running it."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from .. import memory
from ..device import resolve_device
from ..memory import GIB
from ..models.plan import plans
from ..pipeline import check_dtype, check_inputs, check_strategies, fit_check
from . import command, console
from .llm import add_llm_arguments, plan_llm_command
from .options import add_run_arguments, add_shape_arguments, check_data, declared_shape, resolve


def _args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_run_arguments(p)
    add_llm_arguments(p)


@command("plan", "Check a run's options and list the models it would build, their size and memory; "
         "runs nothing.", _args)
def plan(args: argparse.Namespace) -> int:
    """Every check `run` makes before training (options, device, dtype, strategies, data), then the table."""
    if args.arch is not None:
        return plan_llm_command(args)
    spec, opts = resolve(args)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies)  # in pipeline.start's order, so the first refusal is run's
    check_inputs(spec, opts, device)  # the data and the bench batch, as `run` checks them
    if "moe" in opts.models:
        check_strategies(spec, opts.strategies, device, opts.dtype)
    spec = check_data(spec, opts, declared_shape(args) if opts.data else {})  # a --data file decides the shape
    t = Table(title=escape(f"plan: {spec} on {device}"))
    for col in ("model", "width", "params", "active params", "GFLOP/inference", "train GiB", "infer GiB",
                "fits"):
        t.add_column(col, justify="left" if col in ("model", "fits") else "right")
    for m in plans(spec, opts.models):
        train_b = m.memory_bytes(opts.batch_size, opts.dtype, training=True)
        infer_b = m.memory_bytes(opts.batch_size, opts.dtype, training=False)
        problem = fit_check(m, opts, device)  # the check `run` makes before allocating
        t.add_row(escape(m.name), f"{m.width:,}", f"{m.params:,}", f"{m.active_params:,}",
                  f"{m.flops_per_inference / 1e9:.4f}", f"{train_b / GIB:.2f}", f"{infer_b / GIB:.2f}",
                  "yes" if problem is None else escape(problem))
    console.print(t)
    data = "from --data" if opts.data else \
        f"~{memory.dataset_bytes(opts.samples, spec.input_dim, spec.classes) / GIB:.2f} GiB on the host"
    batch = memory.batch_bytes(opts.batch_size, spec.input_dim, opts.dtype) / GIB
    console.print(f"inputs: data {data}; bench batch ~{batch:.2f} GiB (checked against free memory like the "
                  "models)", highlight=False)
    return 0
