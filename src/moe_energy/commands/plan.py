"""`moe-energy plan`: validate a run's options and show what it would build, without running it."""

from __future__ import annotations

import argparse

from rich.table import Table

from ..memory import GIB, fit_problem, inference_bytes, training_bytes
from ..runner import check_dtype, model_plan, resolve_device
from . import command, console
from .options import add_run_arguments, add_shape_arguments, resolve


def _args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_run_arguments(p)


@command("plan", "Check a run's options and list the models it would build, their size and memory; "
         "runs nothing.", _args)
def plan(args: argparse.Namespace) -> int:
    spec, opts = resolve(args)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies)
    t = Table(title=f"plan: {spec} on {device}")
    for col in ("model", "width", "params", "active params", "GFLOP/inference", "train GiB", "infer GiB",
                "fits"):
        t.add_column(col, justify="left" if col in ("model", "fits") else "right")
    for name, d in model_plan(spec, opts):
        widest = max(d["width"], spec.input_dim)
        train_b = training_bytes(d["params"], widest, opts.batch_size, spec.layers)
        infer_b = inference_bytes(d["params"], widest, opts.batch_size, opts.dtype)
        problem = fit_problem(train_b if opts.epochs else infer_b, device, f"training {name}")
        t.add_row(name, f"{d['width']:,}", f"{d['params']:,}", f"{d['active_params']:,}",
                  f"{d['flops_per_inference'] / 1e9:.4f}", f"{train_b / GIB:.2f}", f"{infer_b / GIB:.2f}",
                  "yes" if problem is None else problem)
    console.print(t)
    return 0
