"""`moe-energy bench-strategies` (the seed's classifier, or with --arch one LLM MoE layer against its dense FFNs
and transformers' own block) and `moe-energy calibrate`."""

from __future__ import annotations

import argparse
from collections.abc import Collection

import torch
from rich.markup import escape
from rich.table import Table

from ..config import split_list
from ..device import resolve_device
from ..dtypes import DTYPES
from ..errors import ConfigError
from ..measure import roofline
from ..models.strategies import STRATEGIES
from ..runner.core import check_dtype
from ..runner.layer import check_layer_inputs
from ..storage.results import check_writable, stamp
from . import command, console, fmt, notice, save_then_show
from .options import add_llm_arguments, add_shape_arguments, device_of, refuse_others, resolve, resolve_layer
from .tables import busy_roofline_line, weights_lines


def _bench_args(p: argparse.ArgumentParser) -> None:
    add_shape_arguments(p)
    add_llm_arguments(p)
    g = p.add_argument_group("measurement")
    g.add_argument("--batch-size", type=int, dest="batch_size", help="tokens per batch (default 128)")
    g.add_argument("--dtype", help="float32|bfloat16|float16 (default float32)")
    g.add_argument("--device", help="auto|cpu|cuda|mps (default auto: cuda > mps > cpu)")
    g.add_argument("--moe-strategy", dest="strategies",
                   help=f"comma list of {', '.join(STRATEGIES)} (default all)")
    g.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd models (CUDA graphs on a GPU); compile time reported apart")
    g.add_argument("--seconds", type=float, default=3.0, help="timed seconds per group of interleaved models")
    g.add_argument("--seed", type=int, help="seed for the random weights and batch (default 0)")
    g.add_argument("--out", help="directory for the JSON results (default results/)")


def _names(flag: str, text: str | None, choices: Collection[str], seconds: float, most_s: float) -> tuple[str, ...]:
    """``flag``'s comma list (default every choice; each once, order kept), checked with ``--seconds`` before any
    work: one-line errors for an empty list, a name that is not a choice, or ``--seconds`` not in (0, ``most_s``)
    (NaN included)."""
    given = tuple(dict.fromkeys(split_list(text) or ())) if text is not None else tuple(choices)
    if not given:
        raise ConfigError(f"{flag} {text!r}: give at least one of {', '.join(choices)} (or drop {flag} for all)")
    unknown = [g for g in given if g not in choices]
    if unknown:
        raise ConfigError(f"{flag} {','.join(unknown)} is unknown; choose from {', '.join(choices)}")
    if not 0 < seconds < most_s:
        raise ConfigError(f"--seconds {seconds} must be a number of seconds > 0 and < {most_s:g}")
    return given


def strategies_table(doc: dict) -> Table:
    """The printed table of a bench-strategies document: one line per row, notes where a figure needs one."""
    o, env = doc["options"], doc["environment"]
    t = Table(title=escape(f"MoE strategies vs dense ({env['device_name']}, {o['dtype']}, batch {o['batch_size']}"
                           f"{', compiled' if o['compile'] else ''}): median of interleaved rounds"))
    # speed-up: over the seed's optimized MoE (active_loop); eff. vs ideal: active-matched dense ms / this ms
    for col in ("model", "layout", "ms/batch", "inferences/s", "vs active_loop", "eff. vs ideal", "GFLOP/s",
                "bound ms", "of roofline", "note"):
        t.add_column(col, justify="left" if col in ("model", "layout", "note") else "right")
    for r in doc["rows"]:
        if r.get("not_timed"):  # a strategy that cannot run this shape here: its row says why
            t.add_row(escape(r["name"]), "", *["-"] * 7, escape(f"not timed: {r['not_timed']}"))
            continue
        note = ""
        if r["kind"] == "moe" and r.get("resolved_strategy") not in (None, r.get("strategy")):
            note = f"auto chose {r['resolved_strategy']}"
        if r.get("dropped_pairs_per_batch") is not None:
            note = f"drops {r['dropped_pairs_per_batch']}/{r['routed_pairs_per_batch']} pairs"
        if r.get("compile_s") is not None:
            note += f"{'; ' if note else ''}compile {r['compile_s']:.1f} s"
        if above_roofline(r):
            note += f"{'; ' if note else ''}{ABOVE_ROOFLINE}"
        t.add_row(escape(r["name"]), escape(r.get("weight_layout") or ""), fmt(r["ms_per_batch"], ".3f"),
                  fmt(r["inferences_per_second"]), fmt(r["speedup_vs_active_loop"], ".2f", "x"),
                  fmt(r["efficiency_vs_ideal"], ".2f") if r["kind"] == "moe" else "(dense)",
                  fmt(r["achieved_gflops"], ".1f"), fmt(r["roofline_bound_ms"], ".3g"),
                  fmt(r["fraction_of_roofline"], ".0%"), escape(note))
    return t


def _roofline_for(device: torch.device, dtype: str, weights: str | None = None) -> roofline.Roofline:
    return roofline.load_or_calibrate(device, dtype, notice,
                                      say=lambda m: console.print(escape(m), highlight=False), weights=weights)


@command("bench-strategies", "Time every MoE strategy and both dense baselines on one batch; print and save JSON.",
         _bench_args)
def bench_strategies(args: argparse.Namespace) -> int:
    """Check the flags (one-line errors, before any work), time every strategy, print the table, save JSON."""
    from ..bench.strategies import bench_strategies as run_bench

    if getattr(args, "arch", None):
        return bench_layer_command(args)
    refuse_others(args, "seed")
    given = args.strategies
    args.strategies = None  # validated below: the default here is every strategy, not run's default
    spec, opts = resolve(args)
    strategies = _names("--moe-strategy", given, STRATEGIES, args.seconds, 1e6)
    check_writable(opts.out)
    device = resolve_device(opts.device)
    roof = _roofline_for(device, opts.dtype)
    with console.status("benchmarking strategies") as status:
        doc = run_bench(spec, batch_size=opts.batch_size, dtype=opts.dtype, device=device, strategies=strategies,
                        compile=args.compile, seconds=args.seconds, seed=opts.seed, roof=roof,
                        on_phase=lambda msg: status.update(msg))
    doc["options"]["preset"] = opts.extra.get("preset")
    tag = opts.extra.get("preset") or "custom"
    stem = f"strategies-{tag}-{opts.dtype}-b{opts.batch_size}-{stamp(doc)}"
    return save_then_show(doc, opts.out, stem, lambda: show_seed(doc))


def show_seed(doc: dict) -> None:
    console.print(strategies_table(doc))
    if (line := busy_roofline_line(doc)) is not None:
        console.print(escape(line), highlight=False, soft_wrap=True)


def bench_layer_command(args: argparse.Namespace) -> int:
    """`bench-strategies --arch`: the flags checked as `run --arch` checks them (one-line errors, before any
    work; --weights as run's), the layer timed at each token count, the JSON saved, then the table printed."""
    from ..bench.strategies import bench_layer

    given, args.strategies = args.strategies, None  # validated below: the default is every strategy
    if args.compile:
        raise ConfigError("--compile: not with --arch (every model of a layer is timed eager here); drop it")
    w, opts = resolve_layer(args)
    arch, tokens, routing = w.arch, w.tokens, w.routing
    if routing.kind != "random":
        raise ConfigError(f"--routing {routing.text}: bench-strategies --arch times transformers' own router too, "
                          "which cannot be forced; use --routing random (the default)")
    strategies = _names("--moe-strategy", given, STRATEGIES, args.seconds, 1e6)
    check_writable(opts.out)
    device = resolve_device(opts.device)
    check_dtype(device, opts.dtype)
    check_layer_inputs(arch, tokens, device, opts.dtype, w.weights)
    roof = _roofline_for(device, opts.dtype, w.weights)
    with console.status("benchmarking the layer") as status:
        doc = bench_layer(arch, tokens, dtype=opts.dtype, device=device, strategies=strategies, seconds=args.seconds,
                          seed=opts.seed, roof=roof, on_phase=lambda msg: status.update(escape(msg)),
                          weights=w.weights)
    fmt_tag = f"-{w.weights}" if w.weights else ""
    stem = f"strategies-{arch.name}-{opts.dtype}{fmt_tag}-t{'-'.join(map(str, tokens))}-{stamp(doc)}"
    return save_then_show(doc, opts.out, stem, lambda: show_layer(doc))


ABOVE_ROOFLINE = "above roofline: run calibrate --force when the host is idle"


def above_roofline(r: dict) -> bool:
    """A row faster than its bound allows (beyond a read-only kernel's edge over the copy bandwidth): the
    calibration ran slower than this model did, so it, not the model, is wrong."""
    return (r.get("fraction_of_roofline") or 0) > 1.05


def _layer_note(r: dict) -> str:
    notes = []
    if r.get("resolved_strategy") not in (None, r.get("strategy")):
        notes.append(f"auto chose {r['resolved_strategy']}")
    elif r.get("dropped_pairs") is not None:
        notes.append(f"drops {r['dropped_pairs']}/{r['routed_pairs']} pairs")
    if above_roofline(r):
        notes.append(ABOVE_ROOFLINE)
    return "; ".join(notes)


def layer_table(doc: dict) -> Table:
    """One line per (token count, model): ms per forward, tokens/s, speed-up over transformers' fastest, roofline."""
    a, env = doc["arch"], doc["environment"]
    int8 = bool(doc["options"].get("weights"))  # then each row says its weights format: int8 beside the dtype's
    t = Table(title=escape(f"{a['name']} layer: moe-energy strategies vs dense FFNs vs transformers "
                           f"({env['device_name']}, {doc['options']['dtype']}, routing random): median of "
                           "interleaved rounds"))
    for col in ("T", "model", *(("weights",) if int8 else ()), "ms/forward", "best ms", "tokens/s", "vs transformers",
                "GFLOP/s", "bound ms", "of roofline", "note"):
        t.add_column(col, justify="left" if col in ("model", "weights", "note") else "right")
    calibrated = doc["roofline"] is not None
    for r in doc["rows"]:
        roof = [fmt(r["roofline_bound_ms"], ".3g"), fmt(r["fraction_of_roofline"], ".0%")] if calibrated \
            else ["not calibrated"] * 2
        t.add_row(str(r["tokens"]), escape(r["name"]), *((escape(str(r.get("weights"))),) if int8 else ()),
                  fmt(r["ms_per_forward"], ".3f"),
                  fmt(r["ms_per_forward_min"], ".3f"), fmt(r["tokens_per_second"], ",.0f"),
                  fmt(r["speedup_vs_transformers"], ".2f", "x") if r["speedup_vs_transformers"] else "-",
                  fmt(r["achieved_gflops"], ".1f"), *roof, escape(_layer_note(r)))
    return t


def layer_lines(doc: dict) -> list[str]:
    """Under the table: peers that could not run (and why), then auto against transformers' fastest per T."""
    tf = doc["transformers"]
    lines = [f"transformers: {tf['unavailable']}"] if tf["unavailable"] else []
    lines += [f"transformers[{impl}] ({tf['family']}): not timed, {why}"
              for impl, why in tf["implementations"].items() if why]
    for s in doc["summary"]:
        lines += [f"T={s['tokens']}: {name} not timed, {why}" for name, why in s["transformers_not_timed"].items()]
        if s["auto_speedup_vs_transformers"] is None:
            lines.append(f"T={s['tokens']}: no transformers row to compare auto with")
            continue
        frac, dense = s["auto_fraction_of_roofline"], s.get("dense_active_fraction_of_roofline")
        lines.append(f"T={s['tokens']}: moe[auto] {s['auto_ms']:.3f} ms vs {s['fastest_transformers']} "
                     f"{s['fastest_transformers_ms']:.3f} ms: {s['auto_speedup_vs_transformers']:.2f}x; "
                     + (f"{frac:.0%} of the roofline" if frac is not None else "roofline not calibrated")
                     + (f" (dense_active, the same FLOPs in one dense FFN: {dense:.0%})" if dense is not None else ""))
    if doc["roofline_note"]:
        lines.append(f"roofline: {doc['roofline_note']}")
    lines += [line for line in (busy_roofline_line(doc),) if line]
    errs = doc.get("weights_output_error") or {}
    lines += weights_lines({"options": doc["options"], "models": [{"name": n, "weights_output_error": e}
                                                                 for n, e in errs.items()]})
    if errs:
        lines.append(f"transformers' blocks hold the weights in {doc['options']['dtype']}: the speed-ups are "
                     f"{doc['options']['weights']} moe-energy against them")
    return lines


def show_layer(doc: dict) -> None:
    console.print(layer_table(doc))
    for line in layer_lines(doc):
        console.print(escape(line), highlight=False, soft_wrap=True)


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default auto: cuda > mps > cpu)")
    p.add_argument("--dtype", help=f"comma list of {', '.join(DTYPES)} (default all)")
    p.add_argument("--seconds", type=float, default=0.6, help="measuring seconds per figure")
    p.add_argument("--force", action="store_true", help="measure again even if this device is cached")


@command("calibrate", "Measure this device's attainable GEMM FLOP/s and memory bandwidth once, and cache them.",
         _calibrate_args)
def calibrate(args: argparse.Namespace) -> int:
    """Measure (or show the cached) GEMM FLOP/s and memory bandwidth the roofline columns are judged against."""
    dtypes = _names("--dtype", args.dtype, DTYPES, args.seconds, 1e4)
    device = device_of(args.device)
    roof = roofline.load(device, notice=notice)
    unsaved: ConfigError | None = None
    if roof is None or args.force or any(d not in roof.gemm_flops_per_s for d in dtypes):
        with console.status(escape(f"calibrating {roofline.device_name(device)}")):
            roof = roofline.calibrate(device, tuple(dtypes), args.seconds, save=False)
        try:  # cached before anything is printed; a cache that cannot be written still shows the figures
            roofline._store(roof)
        except ConfigError as e:
            unsaved = e
        how = "measured now" + (", not cached" if unsaved else "")
    else:
        how = f"cached, measured {roof.measured_utc} (--force to measure again)"
    console.print(_roofline_table(roof, how))
    if unsaved is not None:
        raise unsaved
    console.print(escape(f"cache: {roofline.cache_path()}"), highlight=False, soft_wrap=True)
    return 0


def _roofline_table(roof: roofline.Roofline, how: str) -> Table:
    """calibrate's table; every text from the cache file escaped (a hand-edited file is the user's text)."""
    t = Table(title=escape(f"roofline of {roof.device_name} ({how})"))
    for col in ("figure", "value", "method"):
        t.add_column(col, justify="right" if col == "value" else "left")
    for d, f in roof.gemm_flops_per_s.items():
        t.add_row(escape(f"GEMM {d}"), f"{f / 1e9:,.1f} GFLOP/s", f"best {roof.gemm_size}^3 matmul")
    t.add_row("memory bandwidth", f"{roof.bandwidth_bytes_per_s / 1e9:,.1f} GB/s",
              f"best copy of {roof.copy_bytes / 2**20:,.0f} MiB (read + write)")
    if roof.busy:
        t.add_row("measured while busy", escape(roof.busy),
                  "other work shared the cores: the figures may be low and every fraction high; run "
                  "`moe-energy calibrate --force` when the host is idle")
    return t
