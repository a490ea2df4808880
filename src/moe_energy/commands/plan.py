"""`moe-energy plan`: validate a run's options and show what it would build, without running it.

Every check `run` makes before any work (options, device, dtype, inputs, strategies, data), in run's order, then
each model's size, FLOPs and memory and whether it fits: the seed's classifiers, or with --arch an LLM layer (the
weights one forward reads at each token count beside them).
"""

from __future__ import annotations

import argparse

import torch
from rich.markup import escape
from rich.table import Table

from .. import memory
from ..config import RunOptions
from ..device import resolve_device
from ..memory import GIB
from ..models.archs import Arch
from ..models.counting import expected_experts_touched
from ..models.plan import ModelPlan
from ..models.routing import RoutingMode, zipf_assignment
from ..runner.core import Workload, check_dtype, unwrapped
from ..runner.layer import Layer, extrapolation_note, named
from ..runner.model import Whole, held_bytes
from ..runner.seed import Seed
from . import command, console
from .options import (
    add_forward_limit,
    add_llm_arguments,
    add_model_arguments,
    add_run_arguments,
    add_shape_arguments,
    resolve_power,
    resolve_workload,
)


def _args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_run_arguments(p)
    add_llm_arguments(p)
    add_model_arguments(p)
    add_forward_limit(p)


@command("plan", "Check a run's options and list the models it would build, their size and memory; "
         "runs nothing.", _args)
def plan(args: argparse.Namespace) -> int:
    """Every check `run` makes before any work, then the tables."""
    w, opts = resolve_workload(args)
    resolve_power(args)  # --config's caps, carbon and price (and the environment's) as numbers, as run checks them
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype, opts.strategies if w.trains else ())  # in run's order: the first refusal is run's
    w.check(opts, device, opts.strategies)
    console.print(escape(f"dtype: {opts.dtype} ({opts.extra.get('dtype_why', 'given')})"), highlight=False)
    if opts.weights:
        console.print(escape(f"weights: {opts.weights} weight-only (per-channel fp32 scales), activations in "
                             f"{opts.dtype}"), highlight=False)
    if isinstance(w, Layer):
        _show_layer(w, opts, device)
    elif isinstance(w, Whole):
        _show_whole(w, opts, device)
    else:
        assert isinstance(w, Seed)
        w.load(opts, torch.device("cpu"), torch.float32, 0)  # the data as run loads it: a --data file decides the shape
        _show_seed(w, opts, device)
    return 0


def _fits(w: Workload, p: ModelPlan, opts: RunOptions, device: torch.device) -> str:
    problem = w.fit_problem(p, opts, device)  # the check `run` makes before allocating
    return "yes" if problem is None else escape(problem)


def _show_seed(w: Seed, opts: RunOptions, device: torch.device) -> None:
    spec = w.spec
    t = Table(title=escape(f"plan: {spec} on {device}"))
    for col in ("model", "width", "params", "active params", "GFLOP/inference", "train GiB", "infer GiB", "fits"):
        t.add_column(col, justify="left" if col in ("model", "fits") else "right")
    for m in w.plans(opts.models):
        train_b = m.memory_bytes(opts.batch_size, opts.dtype, training=True)
        infer_b = m.memory_bytes(opts.batch_size, opts.dtype, training=False)
        t.add_row(escape(m.name), f"{m.width:,}", f"{m.params:,}", f"{m.active_params:,}",
                  f"{m.flops_per_inference / 1e9:.4f}", f"{train_b / GIB:.2f}", f"{infer_b / GIB:.2f}",
                  _fits(w, m, opts, device))
    console.print(t)
    data = "from --data" if opts.data else \
        f"~{memory.dataset_bytes(opts.samples, spec.input_dim, spec.classes) / GIB:.2f} GiB on the host"
    batch = memory.batch_bytes(opts.batch_size, spec.input_dim, opts.dtype) / GIB
    console.print(f"inputs: data {data}; bench batch ~{batch:.2f} GiB (checked against free memory like the "
                  "models)", highlight=False)


def _show_layer(w: Layer, opts: RunOptions, device: torch.device) -> None:
    plans, tokens, arch = w.plans(opts.models), w.tokens, w.arch
    t = Table(title=escape(f"plan: {arch.name} layer on {device}, {opts.dtype}"))
    for col in ("model", "width", "params", "active params", "GFLOP/token", "weights GiB",
                f"GiB at T={max(tokens)}", "fits"):
        t.add_column(col, justify="left" if col in ("model", "fits") else "right", overflow="fold")
    for p in plans:
        at_max = p.memory_bytes(max(tokens), opts.dtype, strategies=named(opts.strategies) if p.kind == "moe" else ())
        t.add_row(escape(p.name), f"{p.width:,}", f"{p.params:,}", f"{p.active_params:,}",
                  f"{p.flops_per_inference / 1e9:.4f}", f"{p.weight_bytes(opts.dtype) / GIB:.2f}",
                  f"{at_max / GIB:.2f}", _fits(w, p, opts, device))
    console.print(t)
    fits = [p for p in plans if w.fit_problem(p, opts, device) is None]
    if len(fits) > 1:
        problem = w.together_problem(fits, opts, device)
        together = "built and measured together" if problem is None else \
            f"measured one at a time ({unwrapped(problem)})"
        console.print(escape(f"models: {together}"), highlight=False, soft_wrap=True)
    console.print(_traffic(plans, arch, opts, tokens, w.routing))
    if arch.moe_layers > 1:
        console.print(escape(f"whole-model figures: {extrapolation_note(arch)}"), highlight=False, soft_wrap=True)


def _show_whole(w: Whole, opts: RunOptions, device: torch.device) -> None:
    """Each model's layers built of its total (the largest that fits unless --layers), its weights, the KV caches
    of its decode points, the largest point's activations, and whether it fits."""
    t = Table(title=escape(f"plan: whole models on {device}, {opts.dtype}, batch {w.batches} x context "
                           f"{w.contexts}, MoE blocks: {w.impl}, engine: {w.engine}"))
    for col in ("model", "layers", "params built", "active", "weights GiB", "KV caches GiB", "activations GiB",
                "fits"):
        t.add_column(col, justify="left" if col in ("model", "fits") else "right", overflow="fold")
    points = w.points()
    for p in w.plans(opts.models):
        m, n = w._model(p), w.chosen[p.name]
        held = held_bytes(m, n, opts.dtype, points)
        runtime = ("vLLM's", "vLLM's") if w.vllm else (f"{held['kv_caches'] / GIB:.2f}",
                                                       f"{held['activations'] / GIB:.2f}")
        t.add_row(escape(m.name), f"{n} of {m.layers}", f"{p.params:,}", f"{p.active_params:,}",
                  f"{held['weights'] / GIB:.2f}", *runtime, _fits(w, p, opts, device))
    console.print(t)
    for m in w.models:
        console.print(escape(f"{m.name}: {w.chosen[m.name]} of {m.layers} layers: {w.why[m.name]}"), highlight=False)
    if w.vllm:
        console.print(w.together_problem(w.plans(opts.models), opts, device) + "; it sizes its KV cache and "
                      "activations from what its weights leave", highlight=False)
    if any(w.chosen[m.name] < m.layers for m in w.models):
        console.print("whole-model figures of a model built in part are EXTRAPOLATED (x a token's matrix work in "
                      "all its layers / in those built, the LM head in both), and labelled so", highlight=False)


def _touched_cell(arch: Arch, routing: RoutingMode, tokens: int, seed: int) -> str:
    """Experts T tokens reach: exact for balanced, counted for skewed, the uniform expectation for random."""
    e, k = arch.experts, arch.top_k
    if routing.kind == "balanced":
        return f"{min(e, tokens * k)}"
    if routing.kind == "skewed" and routing.alpha is not None and tokens * e <= 2**22:
        return f"{zipf_assignment(tokens, e, k, routing.alpha, seed).unique().numel()}"
    return f"~{expected_experts_touched(e, k, tokens):.1f} if uniform"


def _traffic(plans: list[ModelPlan], arch: Arch, opts: RunOptions, tokens: list[int], routing: RoutingMode) -> Table:
    """Per token count: experts reached and the weight bytes one forward reads, MoE against dense."""
    t = Table(title=escape(f"weights one forward reads (routing {routing.text})"))
    for col in ("T", "experts touched", *(f"{p.name} MiB" for p in plans)):
        t.add_column(col, justify="right")
    for T in tokens:
        cell = _touched_cell(arch, routing, T, opts.seed)
        touched = expected_experts_touched(arch.experts, arch.top_k, T) if cell.startswith("~") else float(cell)
        t.add_row(str(T), cell, *[f"{(p.weight_bytes_read(opts.dtype, touched) or 0) / 2**20:,.1f}" for p in plans])
    return t
