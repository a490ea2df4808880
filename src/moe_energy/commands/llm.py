"""`moe-energy run --arch NAME` and `moe-energy plan --arch NAME`: one LLM MoE FFN layer against the dense
SwiGLU FFNs matched to its total and active params, at several token counts per forward (issue 13).

run.py and plan.py hand over to ``run_llm_command`` / ``plan_llm_command`` when ``--arch`` is given; the
shared options (--duration, --repeats, --device, --dtype, --moe-strategy, --models, --meter, ...) mean what
they mean for the seed's models. Nothing is trained, so the seed's shape and training flags are refused.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from ..capped import run_and_save
from ..config import RunOptions, load_toml, split_list
from ..device import llm_default_dtype, resolve_device
from ..errors import ConfigError
from ..llm_pipeline import (
    DEFAULT_TOKENS,
    LayerPlan,
    check_layer_inputs,
    check_layer_strategies,
    check_tokens,
    extrapolation_note,
    fit_alone,
    layer_plans,
    layer_stem,
    named,
    run_llm,
    together_problem,
    unwrapped,
)
from ..memory import GIB
from ..models.archs import PRESETS, ROUTER_KINDS, Arch, RouterSpec, custom_arch, get_arch
from ..models.counting import expected_experts_touched
from ..models.routing import ROUTING_HELP, RoutingMode, parse_routing, zipf_assignment
from ..pipeline import check_dtype
from ..results import check_writable, run_stem
from . import console, err_console, fmt, measured
from .options import meter_from_args, resolve, resolve_power
from .power import check_power, power_columns, restore_status
from .ui import RichUI

# The seed's flags that mean nothing for a layer built, not trained: refused, not silently ignored.
SEED_FLAGS = {"preset": "--preset", "hidden": "--hidden", "layers": "--layers", "input_dim": "--input-dim",
              "classes": "--classes", "data": "--data", "epochs": "--epochs", "lr": "--lr",
              "batch_size": "--batch-size", "samples": "--samples"}
SHAPE_FLAGS = (("d_model", "--d-model"), ("ffn_dim", "--ffn-dim"), ("experts", "--experts"), ("top_k", "--top-k"),
               ("shared_experts", "--shared-experts"))


def add_llm_arguments(p: argparse.ArgumentParser) -> None:
    """--arch, --tokens, --routing and the custom-shape flags; --experts/--top-k only if not there already."""
    g = p.add_argument_group("LLM MoE layer (--arch: nothing trained; inputs are hidden states [tokens, d_model])")
    g.add_argument("--arch", help=f"a layer preset ({', '.join(PRESETS)}; see 'moe-energy archs') or 'custom' "
                                  "(with --d-model, --ffn-dim, --experts, --top-k)")
    g.add_argument("--tokens", help="comma list of tokens per forward, from a decoding batch to a prefill chunk "
                                    f"(default {','.join(map(str, DEFAULT_TOKENS))})")
    g.add_argument("--routing", help=f"{ROUTING_HELP} (default random: the router's own choice, random weights)")
    g.add_argument("--d-model", type=int, dest="d_model", help="hidden size d (custom, or overrides the preset)")
    g.add_argument("--ffn-dim", type=int, dest="ffn_dim", help="each routed expert's SwiGLU width I")
    g.add_argument("--shared-experts", type=int, dest="shared_experts", help="always-on experts (0 for none)")
    g.add_argument("--router", help=f"router kind: {', '.join(ROUTER_KINDS)} (default the preset's)")
    have = set(p._option_string_actions)  # the seed's shape group may hold them already
    if "--experts" not in have:
        g.add_argument("--experts", type=int, help="routed experts E")
    if "--top-k" not in have:
        g.add_argument("--top-k", type=int, dest="top_k", help="experts per token k")


def add_forward_limit(p: argparse.ArgumentParser) -> None:
    """--max-forward-s, for the commands that measure windows (run; sweep has its own, a grid option)."""
    p.add_argument("--max-forward-s", type=float, dest="max_forward_s", metavar="S",
                   help="--arch: skip a (model, token count) whose one forward takes longer than S seconds at this "
                        "host's roofline bound (calibrated once if needed), with the reason; default: no limit")


# Flags that only mean something with --arch: refused on the seed's classifier, never silently ignored.
LLM_ONLY = (("tokens", "--tokens"), ("routing", "--routing"), ("d_model", "--d-model"), ("ffn_dim", "--ffn-dim"),
            ("shared_experts", "--shared-experts"), ("router", "--router"), ("max_forward_s", "--max-forward-s"))


def refuse_llm_only(args: argparse.Namespace) -> None:
    """One line for LLM-layer flags given without --arch."""
    stray = [flag for key, flag in LLM_ONLY if getattr(args, key, None) is not None]
    if stray:
        raise ConfigError(f"{', '.join(stray)}: only with --arch (an LLM MoE layer); add --arch or drop them")


# ---------------------------------------------------------------------------------------------------------
# From flags to (arch, options, tokens, routing)


def parse_tokens(text: str | None) -> list[int]:
    """'1,16,128' -> [1, 16, 128]; one-line ConfigError for anything else."""
    if text is None:
        return list(DEFAULT_TOKENS)
    vals: list[int] = []
    for part in split_list(text) or ():
        try:
            vals.append(int(part))
        except ValueError:
            raise ConfigError(f"--tokens {text!r}: {part!r} is not a whole number; give a comma list such as "
                              "1,16,128,1024") from None
    return check_tokens(vals, "--tokens")


def arch_from_args(args: argparse.Namespace) -> Arch:
    """A preset, a preset with some fields replaced (named NAME-custom), or a custom shape."""
    over = {k: getattr(args, k) for k, _ in SHAPE_FLAGS if getattr(args, k, None) is not None}
    router = getattr(args, "router", None)
    if args.arch == "custom":
        missing = [flag for k, flag in SHAPE_FLAGS[:4] if k not in over]
        if missing:
            raise ConfigError(f"--arch custom needs {', '.join(missing)} (and optionally --shared-experts, --router)")
        return custom_arch(over["d_model"], over["ffn_dim"], over["experts"], over["top_k"],
                           over.get("shared_experts", 0), router or "softmax_topk")
    base = get_arch(args.arch)
    if not over and router is None:
        return base
    fields: dict[str, Any] = dict(over)
    if "shared_experts" in fields:  # new shared experts take the routed width (DeepSeek's convention)
        n = fields["shared_experts"]
        fields["shared_width"] = (base.shared_width or fields.get("ffn_dim", base.ffn_dim)) if n else 0
        fields["shared_gate"] = base.shared_gate and bool(n)
    if router is not None:
        fields["router"] = RouterSpec(kind=router)
    what = ", ".join(f"{k}={v}" for k, v in {**over, **({"router": router} if router else {})}.items())
    return replace(base, name=f"{base.name}-custom", source=f"{base.name} with {what} (from {base.source})",
                   **fields)


def default_dtype(args: argparse.Namespace, opts: RunOptions) -> str:
    """--dtype (or the --config file's) when given, else bfloat16 on a GPU with native support, float32 elsewhere."""
    cfg = load_toml(args.config) if getattr(args, "config", None) else {}
    if getattr(args, "dtype", None) is not None or "dtype" in cfg:
        return opts.dtype
    return llm_default_dtype(resolve_device(opts.device))


def resolve_llm(args: argparse.Namespace) -> tuple[Arch, RunOptions, list[int], RoutingMode]:
    """Everything --arch runs with, checked: one-line ConfigErrors, the seed's flags refused."""
    if not getattr(args, "arch", None):
        raise ConfigError(f"--arch is required here: one of {', '.join(PRESETS)} or custom")
    given = [flag for key, flag in SEED_FLAGS.items() if getattr(args, key, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: no meaning with --arch (an LLM layer is built, not trained, and its "
                          "shape is --d-model, --ffn-dim, --experts, --top-k); drop "
                          f"{'it' if len(given) == 1 else 'them'}")
    arch = arch_from_args(args)
    seedless = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("experts", "top_k")})
    _spec, opts = resolve(seedless)  # the shared options, checked as run checks them
    opts = replace(opts, dtype=default_dtype(args, opts))
    routing = parse_routing(args.routing if getattr(args, "routing", None) is not None else "random")
    return arch, opts, parse_tokens(getattr(args, "tokens", None)), routing


# ---------------------------------------------------------------------------------------------------------
# run


def _figure(m: dict, key: str, spec: str) -> str:
    """'median [min-max]' when repeats differ, else the median; 'not measured' for None."""
    med, lo, hi = m.get(key), m.get(f"{key}_min"), m.get(f"{key}_max")
    if med is None:
        return "not measured"
    if lo is None or hi is None or m.get("repeats", 1) < 2 or lo == hi:
        return fmt(med, spec)
    return f"{fmt(med, spec)} [{lo:.3g}-{hi:.3g}]"


def _touched(m: dict, experts: int) -> str:
    if m.get("kind") != "moe":
        return "all weights"
    return "-" if m.get("experts_touched") is None else f"{m['experts_touched']:g} of {experts}"


def layer_table(doc: dict) -> Table:
    """One row per (model, token count): the per-token figures of one layer."""
    arch, env = doc["arch"], doc["environment"]
    reps = max((m.get("repeats", 1) for m in doc["models"]), default=1)
    t = Table(title=escape(f"moe-energy {arch['name']}: one layer, {env['device_name']}, {doc['options']['dtype']}, "
                           f"routing {doc['routing']['mode']}; median [min-max] of {reps} window(s)"))
    extra = power_columns(doc)
    for col in ("model", "T", "tokens/s", "tokens/J", "J/1k tokens", "avg W", "method", "experts touched",
                "load max/mean", "p50 ms", *[h for h, _ in extra]):
        t.add_column(escape(col), justify="left" if col in ("model", "method", "experts touched") else "right",
                     overflow="fold")
    for m in doc["models"]:
        name, T = escape(m["name"].split("@")[0]), str(m["tokens_per_forward"])
        if m.get("skipped"):
            why = m["skipped"] if m.get("status") == "failed" else f"skipped: {m['skipped']}"
            t.add_row(name, T, escape(why.split(" (")[0]), *["-"] * (7 + len(extra)))
            continue
        est = " (estimate)" if m.get("energy_is_estimate") else ""
        load = m.get("expert_load_max_over_mean")
        j1k, watts = m.get("joules_per_1k_tokens"), m.get("average_power_w")
        t.add_row(name, T, _figure(m, "inferences_per_second", ",.1f"),
                  _figure(m, "inferences_per_joule", ",.2f") + (est if m.get("inferences_per_joule") else ""),
                  fmt(j1k, ",.3f") + (est if j1k is not None else ""), fmt(watts, ".1f") + (est if watts else ""),
                  escape(m["energy_method"]), _touched(m, arch["experts"]), "-" if load is None else f"{load:.2f}",
                  fmt(m.get("latency_p50_ms"), ".3f"), *[escape(cell(m)) for _, cell in extra])
    return t


def model_table(doc: dict) -> Table:
    """The whole-model figure, labelled as the extrapolation it is."""
    t = Table(title="whole model, EXTRAPOLATED from one layer")
    for col in ("model", "T", "model tokens/s", "model J/1k tokens"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for m in doc["models"]:
        x = m.get("model_extrapolated")
        if x:
            t.add_row(escape(m["name"].split("@")[0]), str(m["tokens_per_forward"]),
                      fmt(x["tokens_per_second"], ",.2f"), fmt(x["joules_per_1k_tokens"], ",.2f"))
    return t


def print_layer_results(doc: dict) -> None:
    from .run import energy_summary  # here: run.py imports this module

    console.print(layer_table(doc))
    if doc["arch"]["moe_layers"] > 1 and any(m.get("model_extrapolated") for m in doc["models"]):
        console.print(model_table(doc))
        console.print(escape(doc.get("extrapolation", "")), highlight=False, soft_wrap=True)
    for line in energy_summary(doc):
        console.print(escape(line), highlight=False, soft_wrap=True)


def run_llm_command(args: argparse.Namespace) -> int:
    """`moe-energy run --arch NAME`: measure, save the JSON, print the table (exit 1 if nothing measured)."""
    arch, opts, tokens, routing = resolve_llm(args)
    check_writable(opts.out)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype)
    caps, carbon = resolve_power(args)
    meter = meter_from_args(args, device, notice=lambda msg: err_console.print(f"notice: {escape(msg)}",
                                                                               highlight=False, soft_wrap=True))
    plan = check_power(caps, meter, device)  # before any layer is built: a refused cap is exit 2 now
    meter = plan.wrap(meter)

    def job() -> tuple[dict, Path]:
        body = lambda: run_llm(arch, opts, tokens, routing, meter, RichUI(console), save=False)[0]  # noqa: E731
        return run_and_save(plan, carbon, body, opts.out, lambda d: run_stem(d, layer_stem(arch.name)))

    done = measured(job, print_layer_results)
    if isinstance(done, int):
        return done
    doc, _path = done
    return restore_status(plan) or _exit_status(doc)


def _exit_status(doc: dict) -> int:
    measured = [m for m in doc["models"] if m.get("status") == "measured"]
    if not measured:
        print("error: no model was measured (see the reasons above); choose a smaller arch or fewer --tokens",
              file=sys.stderr)
        return 1
    if not any(m.get("repeats") for m in measured):
        print("error: every measurement window failed (each window's reason is in the JSON); run 'moe-energy "
              "meters' to see what works here", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# plan


def _touched_cell(arch: Arch, routing: RoutingMode, tokens: int, seed: int) -> str:
    """Experts T tokens reach: exact for balanced, counted for skewed, the uniform expectation for random."""
    e, k = arch.experts, arch.top_k
    if routing.kind == "balanced":
        return f"{min(e, tokens * k)}"
    if routing.kind == "skewed" and routing.alpha is not None and tokens * e <= 2**22:
        return f"{zipf_assignment(tokens, e, k, routing.alpha, seed).unique().numel()}"
    return f"~{expected_experts_touched(e, k, tokens):.1f} if uniform"


def plan_rows(plans: list[LayerPlan], opts: RunOptions, tokens: list[int], device: torch.device) -> Table:
    t = Table(title=escape(f"plan: {plans[0].arch.name} layer on {device}, {opts.dtype}"))
    for col in ("model", "width", "params", "active params", "GFLOP/token", "weights GiB",
                f"GiB at T={max(tokens)}", "fits"):
        t.add_column(col, justify="left" if col in ("model", "fits") else "right", overflow="fold")
    for p in plans:
        problem = fit_alone(p, opts, tokens, device)  # the check run makes before building
        at_max = p.memory_bytes(max(tokens), opts.dtype, named(opts.strategies) if p.kind == "moe" else ())
        t.add_row(escape(p.name), f"{p.width:,}", f"{p.params:,}", f"{p.active_params:,}",
                  f"{p.flops_per_token / 1e9:.4f}", f"{p.weight_bytes(opts.dtype) / GIB:.2f}", f"{at_max / GIB:.2f}",
                  "yes" if problem is None else escape(problem))
    return t


def traffic_rows(plans: list[LayerPlan], opts: RunOptions, tokens: list[int], routing: RoutingMode) -> Table:
    """Per token count: experts reached and the weight bytes one forward reads, MoE against dense."""
    arch = plans[0].arch
    t = Table(title=escape(f"weights one forward reads (routing {routing.text})"))
    t.add_column("T", justify="right")
    t.add_column("experts touched", justify="right")
    for p in plans:
        t.add_column(f"{p.name} MiB", justify="right")
    for T in tokens:
        cell = _touched_cell(arch, routing, T, opts.seed)
        touched = expected_experts_touched(arch.experts, arch.top_k, T) if cell.startswith("~") else float(cell)
        t.add_row(str(T), cell, *[f"{(p.weight_bytes_read(touched, opts.dtype) or 0) / 2**20:,.1f}" for p in plans])
    return t


def plan_llm_command(args: argparse.Namespace) -> int:
    """`moe-energy plan --arch NAME`: every check run makes before building, then sizes and memory; runs nothing."""
    arch, opts, tokens, routing = resolve_llm(args)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype)
    check_layer_inputs(arch, tokens, device, opts.dtype)
    if "moe" in opts.models:
        check_layer_strategies(arch, opts.strategies, device, opts.dtype)
    plans = layer_plans(arch, opts.models)
    console.print(plan_rows(plans, opts, tokens, device))
    fits = [p for p in plans if fit_alone(p, opts, tokens, device) is None]
    problem = together_problem(fits, opts, tokens, device)
    if len(fits) > 1:
        together = "built and measured together" if problem is None else \
            f"measured one at a time ({unwrapped(problem)})"
        console.print(escape(f"models: {together}"), highlight=False, soft_wrap=True)
    console.print(traffic_rows(plans, opts, tokens, routing))
    if arch.moe_layers > 1:
        console.print(escape(f"whole-model figures: {extrapolation_note(arch)}"), highlight=False, soft_wrap=True)
    return 0
