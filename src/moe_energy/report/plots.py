"""The report's plots: each one function ``(frame) -> Figure``, listed in PLOTS (the seed's sizes),
LAYER_PLOTS (LLM layers against tokens per forward, drawn once per arch), WHOLE_PLOTS (whole models against batch
and latency, drawn once per model set) and CAP_PLOTS (every model against the power cap, drawn when the store holds
more than one cap) in the order they appear.

Every plot has a title and units on its axes; estimated energy is drawn with hollow markers (and dashed
lines) and '(estimate)' in its legend, measured energy with filled ones. A plot with nothing to show
still renders, with a line saying why, so a report from a partial sweep is never broken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display, ever: reports are built on servers and in CI

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ..storage.store import LAYER_FAMILY  # noqa: E402
from .analysis import (  # noqa: E402
    ENERGY_METRICS,
    METRICS,
    Crossover,
    Frame,
    as_whole,
    cap_of,
    cap_series,
    crossovers,
    energy_kind,
    layer_crossovers,
    pareto_front,
    ratios,
    time_energy,
    unstable,
    value,
    weights_format,
    whole_crossovers,
)

DENSE_STYLE = {"dense_total": ("#222222", "s"), "dense_active": ("#8c8c8c", "D")}
MOE_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#bcbd22"]
MAX_PANELS = 12
EK_STYLES = [("o", "-"), ("^", "--"), ("v", ":"), ("P", "-."), ("X", (0, (5, 1))), ("*", (0, (1, 3)))]  # marker, line


def _loglog(ax: Any, legend_size: int) -> None:
    """Both axes logarithmic, a light grid on every decade, the legend where it fits."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=legend_size, loc="best")


def _style(name: str, strategy_order: list[str]) -> tuple[str, str]:
    if name in DENSE_STYLE:
        return DENSE_STYLE[name]
    s = name[4:-1] if name.startswith("moe[") else name
    i = strategy_order.index(s) if s in strategy_order else len(strategy_order)
    return MOE_COLOURS[i % len(MOE_COLOURS)], "o"


def _pretty(name: str) -> str:
    return {"dense_total": "dense (total-matched)", "dense_active": "dense (active-matched)"}.get(name, name)


def _strategies(frame: Frame) -> list[str]:
    return sorted({str(m.get("strategy")) for m in frame.models if m.get("kind") == "moe"})


def _facets(frame: Frame) -> list[tuple[int, str]]:
    return sorted({(m["batch_size"], m["dtype"]) for m in frame.models}, key=lambda f: (f[0] or 0, str(f[1])))


def _grid(n: int, title: str, width: float = 6.0, height: float = 4.2) -> tuple[Figure, list[Axes]]:
    n = max(1, n)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig, axes


def _by_x(xs: Sequence[Any], *cols: Sequence[Any]) -> tuple[list[Any], ...]:
    """``xs`` and each column paired with it, reordered by ascending x (ties keep their order).

    matplotlib joins a line's points in the order given, and frames hold them in sweep order, so every
    line (and its error bars) goes through here: otherwise a series zig-zags back and forth along x.
    """
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    return tuple([c[i] for i in order] for c in (xs, *cols))


def _empty(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="#555555",
            wrap=True)


def _fmt_params(p: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if p >= div:
            return f"{p / div:.3g}{unit}"
    return f"{p:.0f}"


def _series_plot(frame: Frame, metric: str, ylabel: str, title: str) -> Figure:
    """``metric`` vs each model's total params (log-log), one panel per (batch, dtype), its crossovers marked."""
    facets = _facets(frame)
    fig, axes = _grid(len(facets), title)
    if not facets:
        axes[0].set_title("no measured points")
        axes[0].set_xlabel("total parameters (count, log scale)")
        axes[0].set_ylabel(ylabel)
        _empty(axes[0], "no completed sweep points in the database")
        return fig
    order = _strategies(frame)
    xos = crossovers(frame, [metric])
    for ax, (b, dt) in zip(axes, facets):
        ax.set_title(f"batch {b}, {dt}", fontsize=10)
        ax.set_xlabel("total parameters (count, log scale)")
        ax.set_ylabel(ylabel)
        rows = [m for m in frame.models if m["batch_size"] == b and m["dtype"] == dt]
        drawn = 0
        eks = sorted({m["ek"] for m in rows})
        for name, ek in sorted({(m["name"], m["ek"]) for m in rows}, key=lambda n: (not n[0].startswith("moe"), n)):
            series = _pretty(name) + (f" E/k={ek}" if len(eks) > 1 else "")
            pts = [(m, value(m, metric)) for m in rows if m["name"] == name and m["ek"] == ek]
            pts = [(m, v) for m, v in pts if v is not None and v > 0 and
                   (metric not in ENERGY_METRICS or energy_kind(m) != "none")]
            if not pts:
                continue
            colour, marker = _style(name, order)
            line = "-"
            if len(eks) > 1:  # one model's E/k series share its colour: each its own marker and line, told apart
                marker, line = EK_STYLES[eks.index(ek) % len(EK_STYLES)]
            drawn += _draw_series(ax, [m["params"] for m, _ in pts], pts, metric, colour, marker, series, line)
        if not drawn:
            why = "energy not measured for these points (meter: none)" if metric in ENERGY_METRICS else "no data"
            _empty(ax, why)
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        _mark_crossovers(ax, [c for c in xos if c.batch_size == b and c.dtype == dt], order, len(eks) > 1)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="best")
    return fig


def _draw_series(ax: Axes, xs: list[float], pts: list[tuple[dict, float]], metric: str, colour: str, marker: str,
                 series: str, line: str | tuple = "-") -> int:
    """One model's line through its (record, figure) points in x order, its repeats' spread as error bars, and
    markers filled for measured energy, hollow for estimates; returns how many marker sets it drew."""
    xs, pts = _by_x(xs, pts)
    ys = [v for _, v in pts]
    ax.plot(xs, ys, linestyle=line, color=colour, alpha=0.6, lw=1.2)
    lo = [max(v - (value(m, metric, "min") or v), 0) for m, v in pts]
    hi = [max((value(m, metric, "max") or v) - v, 0) for m, v in pts]
    if any(lo) or any(hi):
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=colour, alpha=0.7, capsize=2)
    drawn = 0
    for kind, face, suffix in (("measured", colour, ""), ("estimate", "none", " (estimate)"), ("none", colour, "")):
        sel = [(x, y) for (m, y), x in zip(pts, xs) if (energy_kind(m) if metric in ENERGY_METRICS
                                                         else "measured") == kind]
        if sel:
            ax.scatter([x for x, _ in sel], [y for _, y in sel], marker=marker, s=42, zorder=3,
                       facecolors=face, edgecolors=colour, linewidths=1.5, label=series + suffix)
            drawn += 1
    return drawn


def _mark_crossovers(ax: Axes, xos: list[Crossover], order: list[str], show_ek: bool = False) -> None:
    lines = []
    fmt = _fmt_params if not xos or xos[0].axis == "params" else (lambda t: f"{t:.3g} tokens")
    for c in xos:
        colour, _ = _style(f"moe[{c.strategy}]", order)
        who = f"moe[{c.strategy}]" + (f" E/k={c.ek}" if show_ek else "")
        if c.status == "crossed" and c.params:
            lo = c.low or c.params
            hi = c.high or ax.get_xlim()[1]
            ax.axvspan(lo, hi, color=colour, alpha=0.10, lw=0)
            ax.axvline(c.params, color=colour, ls="--", lw=1.4,
                       label=f"crossover {who} ~{fmt(c.params)}"
                       + (" (estimate)" if c.energy == "estimate" else ""))
        elif c.status == "below_grid":
            lines.append(f"{who}: ahead from the smallest point")
        elif c.status == "not_reached":
            lines.append(f"{who}: no crossover up to {fmt(c.max_params or 0)}")
    if lines:
        ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="bottom", color="#333333",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})


def average_power_per_model(frame: Frame) -> Figure:
    """Bars: each model's average power during its windows, per point; TDP line when the meter knows it."""
    fig, (ax,) = _grid(1, "Average power per model during the measurement windows", width=9.0, height=4.8)
    ax.set_xlabel("sweep point (total MoE parameters)")
    ax.set_ylabel("average power (W)")
    rows = [m for m in frame.models if value(m, "average_power_w") is not None and energy_kind(m) != "none"]
    if not rows:
        _empty(ax, "power not measured (meter: none)")
        return fig
    order = _strategies(frame)
    multi = len(_facets(frame)) > 1
    cats = []
    for m in sorted(rows, key=lambda m: (m["total_params"] or 0, m["batch_size"] or 0, str(m["dtype"]))):
        c = (m["point_id"], f"{m['label']}\n{_fmt_params(m['total_params'] or 0)}"
             + (f"\nb{m['batch_size']} {m['dtype']}" if multi else ""))
        if c not in cats:
            cats.append(c)
    names = sorted({m["name"] for m in rows}, key=lambda n: (not n.startswith("moe"), n))
    width = 0.8 / len(names)
    seen: set[str] = set()
    for j, name in enumerate(names):
        for i, (pid, _) in enumerate(cats):
            m = next((r for r in rows if r["point_id"] == pid and r["name"] == name), None)
            if m is None:
                continue
            v = value(m, "average_power_w")
            est = energy_kind(m) == "estimate"
            colour, _ = _style(name, order)
            lab = _pretty(name) + (" (estimate)" if est else "")
            lo, hi = value(m, "average_power_w", "min"), value(m, "average_power_w", "max")
            yerr = [[max(v - (lo or v), 0)], [max((hi or v) - v, 0)]]
            ax.bar(i + (j - (len(names) - 1) / 2) * width, v, width * 0.95, yerr=yerr, capsize=2,
                   color="none" if est else colour, edgecolor=colour, hatch="//" if est else None, lw=1.2,
                   label=lab if lab not in seen else None)
            seen.add(lab)
            idle = value(m, "idle_power_w")
            if idle is not None:
                ax.plot([i + (j - (len(names) - 1) / 2) * width], [idle], "_", color="#555555", ms=10, mew=2,
                        label="idle power" if "idle" not in seen else None)
                seen.add("idle")
    ax.set_xticks(range(len(cats)), [c[1] for c in cats], fontsize=8)
    if frame.tdp_w:
        ax.axhline(frame.tdp_w, color="#b00000", ls=":", lw=1.5, label=f"TDP / power limit {frame.tdp_w:.0f} W "
                   f"({frame.tdp_source})")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    return fig


def power_traces(frame: Frame) -> Figure:
    """Power over time inside every window, one panel per sweep point, one line per window."""
    with_trace = [w for w in frame.windows if w.get("trace")]
    point_ids = list(dict.fromkeys(m["point_id"] for m in frame.models
                                   if any(w["model_id"] == m["model_id"] for w in with_trace)))
    shown = _spaced(point_ids)
    title = "Power trace over time in each measurement window"
    if len(shown) < len(point_ids):
        title += f" ({len(shown)} of {len(point_ids)} points)"
    fig, axes = _grid(len(shown), title, height=3.6)
    if not shown:
        axes[0].set_xlabel("time in window (s)")
        axes[0].set_ylabel("power (W)")
        _empty(axes[0], "no power trace recorded (the meter in use samples no power)")
        return fig
    order = _strategies(frame)
    by_model = {m["model_id"]: m for m in frame.models}
    for ax, pid in zip(axes, shown):
        ms = [m for m in frame.models if m["point_id"] == pid]
        ax.set_title(f"{ms[0]['label']} ({_fmt_params(ms[0]['total_params'] or 0)} params, "
                     f"batch {ms[0]['batch_size']}, {ms[0]['dtype']})", fontsize=9)
        ax.set_xlabel("time in window (s)")
        ax.set_ylabel("power (W)")
        seen: set[str] = set()
        for w in (w for w in with_trace if by_model.get(w["model_id"], {}).get("point_id") == pid):
            m = by_model[w["model_id"]]
            colour, _ = _style(m["name"], order)
            est = (w.get("energy_method") or m.get("energy_method")) == "estimate"
            series = w["trace"]
            if len(series) > 1 and len({len(s[1]) for s in series}) == 1:  # same sampling: sum the devices
                t, p = series[0][1], [sum(vals) for vals in zip(*(s[2] for s in series))]
            else:
                t, p = series[0][1], series[0][2]
            t, p = _by_x(t, p)
            lab = _pretty(m["name"]) + (" (estimate)" if est else "")
            ax.plot(t, p, "--" if est else "-", color=colour, lw=1.0, alpha=0.8, label=lab if lab not in seen else None)
            seen.add(lab)
        if frame.tdp_w:
            ax.axhline(frame.tdp_w, color="#b00000", ls=":", lw=1.2, label="TDP / power limit")
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    return fig


def energy_latency_scatter(frame: Frame) -> Figure:
    """Energy per inference vs batch latency for every model measured; the Pareto front joins the best."""
    fig, (ax,) = _grid(1, "Energy per inference vs batch latency, with the Pareto front", width=7.5, height=5.0)
    ax.set_xlabel("batch latency p50 (ms, log scale)")
    ax.set_ylabel("energy per inference (mJ, log scale)")
    rows = []
    for m in frame.models:
        ipj, lat = value(m, "inferences_per_joule"), value(m, "latency_p50_ms")
        if ipj and lat and energy_kind(m) != "none":
            rows.append((m, lat, 1e3 / ipj))
    if not rows:
        _empty(ax, "energy not measured (meter: none)")
        return fig
    order = _strategies(frame)
    seen: set[str] = set()
    for m, lat, mj in rows:
        colour, marker = _style(m["name"], order)
        est = energy_kind(m) == "estimate"
        lab = _pretty(m["name"]) + (" (estimate)" if est else "")
        ax.scatter([lat], [mj], marker=marker, s=40, facecolors="none" if est else colour, edgecolors=colour,
                   linewidths=1.4, label=lab if lab not in seen else None, zorder=3)
        seen.add(lab)
    for kind, ls in (("measured", "-"), ("estimate", "--")):
        sub = [(lat, mj) for m, lat, mj in rows if energy_kind(m) == kind]
        if len(sub) >= 1:
            fx, fy = _by_x(*zip(*(sub[i] for i in pareto_front(sub))))
            ax.plot(fx, fy, ls, color="#444444", lw=1.2, zorder=2,
                    label="Pareto front" + (" (estimate)" if kind == "estimate" else ""))
    _loglog(ax, 8)
    ax.text(0.99, 0.01, "front: no other model is both faster and cheaper per inference", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="#555555")
    return fig


def ratio_vs_batch_size(frame: Frame) -> Figure:
    """MoE / dense (total-matched) inferences per joule against batch size, one line per size and strategy."""
    fig, (ax,) = _grid(1, "MoE / dense energy efficiency ratio vs batch size (above 1: MoE wins)",
                       width=7.5, height=5.0)
    ax.set_xlabel("batch size (inferences per batch, log scale)")
    ax.set_ylabel("inferences/J ratio, MoE / dense (total-matched)")
    rs = ratios(frame, "inferences_per_joule")
    if not rs:
        _empty(ax, "no comparable MoE and dense energy figures (energy not measured?)")
        return fig
    order = _strategies(frame)
    lines: dict[tuple, list[dict]] = {}
    for r in rs:
        lines.setdefault((r["params"], r["label"], r["strategy"], r["dtype"]), []).append(r)
    cmap = matplotlib.colormaps["viridis"]
    sizes = sorted({k[0] for k in lines})
    for (params, label, strategy, dtype), pts in sorted(lines.items()):
        bs, ys = _by_x([r["batch_size"] for r in pts], [r["ratio"] for r in pts])
        colour = cmap(sizes.index(params) / max(1, len(sizes) - 1))
        est = all(r["energy"] == "estimate" for r in pts)
        ls = {0: "-", 1: "--", 2: ":", 3: "-."}[order.index(strategy) % 4 if strategy in order else 0]
        ax.plot(bs, ys, ls, marker="o", color=colour,
                mfc="none" if est else colour, label=f"{label} ({_fmt_params(params)}) moe[{strategy}] {dtype}"
                + (" (estimate)" if est else ""))
    ax.axhline(1.0, color="#b00000", lw=1.2, ls=":", label="parity")
    batches = sorted({r["batch_size"] for r in rs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    if len(batches) == 1:
        ax.set_xlim(batches[0] / 2, batches[0] * 2)
        ax.text(0.02, 0.98, "only one batch size measured: sweep --batch-size 32,128,512 for a curve",
                transform=ax.transAxes, va="top", fontsize=8, color="#555555")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best", handles=None if len(lines) <= 16 else [
        Line2D([], [], color="#b00000", ls=":", label="parity")])
    return fig


# -- LLM layers: against tokens per forward ---------------------------------------------------------------
LayerFacet = tuple[str, str, str, str]  # (arch, routing, dtype, weights format): one panel


def _facet(m: dict) -> LayerFacet:
    """The panel a layer record is drawn in: int8 weights get panels of their own, never the dtype's."""
    return str(m.get("arch")), str(m.get("routing")), str(m["dtype"]), weights_format(m)


def _layer_facets(frame: Frame) -> list[LayerFacet]:
    return sorted({_facet(m) for m in frame.layers})


def _facet_rows(frame: Frame, f: LayerFacet) -> list[dict]:
    return [m for m in frame.layers if _facet(m) == f and isinstance(m.get("tokens_per_forward"), int)]


def _base(name: str) -> str:
    """'moe[auto]@T=16' -> 'moe[auto]': one series per model over its token counts."""
    return name.split("@")[0]


def _layer_order(rows: list[dict]) -> list[str]:
    return sorted({_base(m["name"]) for m in rows}, key=lambda n: (not n.startswith("moe"), n))


def _layer_axes(frame: Frame, title: str, ylabel: str) -> tuple[Figure, list[tuple[Axes, LayerFacet]]]:
    """One panel per (arch, routing, dtype, weights format), tokens per forward on a log2 x axis; an empty frame says
    so."""
    facets = _layer_facets(frame)
    fig, axes = _grid(len(facets), title)
    for ax in axes:
        ax.set_xlabel("tokens per forward (log scale: decoding on the left, prefill on the right)")
        ax.set_ylabel(ylabel)
    if not facets:
        _empty(axes[0], "no LLM layer measured in the database")
    for ax, (arch, routing, dtype, weights) in zip(axes, facets):
        ax.set_title(f"{arch}, routing {routing}, {dtype}" + (f", {weights} weights" if weights != dtype else ""),
                     fontsize=10)
    return fig, list(zip(axes, facets))


def _token_ticks(ax: Axes, rows: list[dict]) -> None:
    ts = sorted({m["tokens_per_forward"] for m in rows})
    ax.set_xscale("log", base=2)
    if ts:
        ax.set_xticks(ts, [str(t) for t in ts])
        if len(ts) == 1:
            ax.set_xlim(ts[0] / 2, ts[0] * 2)


def layer_tokens_per_joule(frame: Frame) -> Figure:
    """Tokens/J of the MoE layer and both dense SwiGLU FFNs against tokens per forward; the crossover over tokens
    (MoE vs the total-matched FFN, interval from the repeats) marked as the size crossover is."""
    fig, panels = _layer_axes(frame, "Tokens per joule vs tokens per forward",
                              "tokens per joule (tokens/J, log scale)")
    xos = layer_crossovers(frame, ["inferences_per_joule"])
    strategies = sorted({str(m.get("strategy")) for m in frame.layers if m["kind"] == "moe"})
    for ax, f in panels:
        rows = _facet_rows(frame, f)
        drawn = 0
        for name in _layer_order(rows):
            pts = [(m, v) for m in rows if _base(m["name"]) == name
                   and (v := value(m, "inferences_per_joule")) is not None and v > 0 and energy_kind(m) != "none"]
            if pts:
                colour, marker = _style(name, strategies)
                drawn += _draw_series(ax, [m["tokens_per_forward"] for m, _ in pts], pts, "inferences_per_joule",
                                      colour, marker, _pretty(name))
        if not drawn:
            _empty(ax, "energy not measured for this layer (meter: none)")
            continue
        _token_ticks(ax, rows)
        ax.set_yscale("log")
        _mark_crossovers(ax, [c for c in xos if (c.arch, c.routing, c.dtype, c.weights) == f], strategies)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="best")
    return fig


def layer_experts_touched(frame: Frame) -> Figure:
    """Experts the routing reached per forward (counted on the device) against tokens per forward, beside what
    uniform routing would reach and the layer's E: past a few dozen tokens a forward reads nearly every expert."""
    fig, panels = _layer_axes(frame, "Experts touched per forward vs tokens per forward",
                              "experts touched per forward (count)")
    for ax, f in panels:
        rows = [m for m in _facet_rows(frame, f) if m["kind"] == "moe"]
        counted = [m for m in rows if finite_pos(m.get("experts_touched"))]
        if not counted:
            _empty(ax, "no routing counted (no MoE layer measured here)")
            continue
        for i, name in enumerate(_layer_order(counted)):
            xs, ys = _by_x(*zip(*((m["tokens_per_forward"], m["experts_touched"]) for m in counted
                                  if _base(m["name"]) == name)))
            ax.plot(xs, ys, "-o", color=MOE_COLOURS[i % len(MOE_COLOURS)], label=f"{_pretty(name)} (counted)")
        uniform = [(m["tokens_per_forward"], m["experts_touched_if_uniform"]) for m in rows
                   if finite_pos(m.get("experts_touched_if_uniform"))]
        if uniform:
            ux, uy = _by_x(*zip(*sorted(set(uniform))))
            ax.plot(ux, uy, "--", color="#8c8c8c", lw=1.2, label="expected if routing were uniform")
        experts = next((m["point_experts"] for m in rows if m.get("point_experts")), None)
        if experts:
            ax.axhline(experts, color="#b00000", ls=":", lw=1.2, label=f"all {experts} experts")
        _token_ticks(ax, counted)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="best")
    return fig


def finite_pos(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _roof_point(m: dict) -> tuple[float, float] | None:
    """(FLOPs per weight byte read, achieved GFLOP/s) of one record's forward, or None if not measured."""
    flops, nbytes, tps = m.get("flops_per_batch"), m.get("weight_bytes_per_batch"), m.get("tokens_per_second")
    t = m.get("tokens_per_forward")
    if not (finite_pos(flops) and finite_pos(nbytes) and finite_pos(tps) and isinstance(t, int)):
        return None
    return flops / nbytes, flops / (t / tps) / 1e9


def _roof(rows: list[dict]) -> tuple[float, float] | None:
    """(GEMM GFLOP/s, copy GB/s) of the calibration the records were judged against, read back from a record's
    bounds (bytes / memory-bound time, FLOPs / compute-bound time); None when never calibrated."""
    for m in rows:
        mem, comp = m.get("memory_bound_ms"), m.get("compute_bound_ms")
        if finite_pos(mem) and finite_pos(comp) and finite_pos(m.get("flops_per_batch")) \
                and finite_pos(m.get("weight_bytes_per_batch")):
            return m["flops_per_batch"] / comp / 1e6, m["weight_bytes_per_batch"] / mem / 1e6
    return None


def layer_roofline(frame: Frame) -> Figure:
    """The roofline of each layer's forwards: achieved GFLOP/s against FLOPs per weight byte read, under the
    calibrated roof min(GEMM rate, copy bandwidth x intensity); each point labelled with its tokens per forward.
    A decoding step sits on the sloped (memory) part, a prefill chunk under the flat (compute) part."""
    fig, panels = _layer_axes(frame, "Roofline: achieved vs bound, per forward", "achieved GFLOP/s (log scale)")
    strategies = sorted({str(m.get("strategy")) for m in frame.layers if m["kind"] == "moe"})
    for ax, f in panels:
        ax.set_xlabel("FLOPs per weight byte read (arithmetic intensity, log scale)")
        rows = _facet_rows(frame, f)
        pts = [(m, xy) for m in rows if (xy := _roof_point(m)) is not None]
        if not pts:
            _empty(ax, "no forward measured here")
            continue
        for name in _layer_order([m for m, _ in pts]):
            mine = [(m, xy) for m, xy in pts if _base(m["name"]) == name]
            colour, marker = _style(name, strategies)
            xs, ys, ts = _by_x([xy[0] for _, xy in mine], [xy[1] for _, xy in mine],
                               [m["tokens_per_forward"] for m, _ in mine])
            ax.plot(xs, ys, "-" + marker, color=colour, alpha=0.8, label=_pretty(name))
            for x, y, t in zip(xs, ys, ts):
                ax.annotate(f"T={t}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=colour)
        ax.set_xscale("log")
        ax.set_yscale("log")
        roof = _roof(rows)
        if roof is None:
            _empty(ax, "roofline not calibrated: run `moe-energy calibrate`, then sweep again")
        else:
            peak, bw = roof
            lo, hi = ax.get_xlim()
            ridge = peak / bw
            rx = sorted({lo, min(max(ridge, lo), hi), hi})
            ax.plot(rx, [min(peak, bw * x) for x in rx], "-", color="#b00000", lw=2.0, alpha=0.7,
                    label=f"bound: {bw:,.0f} GB/s copy, {peak:,.0f} GFLOP/s GEMM")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    return fig


# -- power caps: every model against the cap -----------------------------------------------------------------
CapPanel = tuple[Axes, str, dict[str, list[dict]], str]  # axes, setting, {model: records by cap}, 'inferences'|'tokens'


def _spaced(keys: list[Any]) -> list[Any]:
    """At most MAX_PANELS of ``keys``, evenly spaced, the first and last included."""
    if len(keys) <= MAX_PANELS:
        return keys
    step = (len(keys) - 1) / (MAX_PANELS - 1)
    return [keys[round(i * step)] for i in range(MAX_PANELS)]


def _cap_panels(frame: Frame, title: str) -> tuple[Figure, list[CapPanel]]:
    """One panel per setting measured at more than one cap (shape, batch, dtype; or an LLM layer's arch, routing,
    dtype and tokens per forward); an empty frame says so."""
    series = cap_series(frame)
    keys = _spaced(sorted(series))
    if len(keys) < len(series):
        title += f" ({len(keys)} of {len(series)} settings)"
    fig, axes = _grid(len(keys), title, height=3.8)
    if not keys:
        axes[0].set_xlabel("power cap (W)")
        _empty(axes[0], "no setting measured at more than one power cap")
    panels = []
    for ax, k in zip(axes, keys):
        layer = any(m.get("family") == LAYER_FAMILY for recs in series[k].values() for m in recs)
        ax.set_title(k, fontsize=9)
        panels.append((ax, k, series[k], "tokens" if layer else "inferences"))
    return fig, panels


def _cap_order(models: dict[str, list[dict]]) -> list[str]:
    return sorted(models, key=lambda n: (not n.startswith("moe"), n))


def _per_cap(frame: Frame, metric: str, title: str, what: str) -> Figure:
    """``metric`` of the MoE and both dense models against the cap; for energy, each model's best cap starred."""
    fig, panels = _cap_panels(frame, title)
    order = sorted({n[4:-1] for _, _, ms, _ in panels for n in ms if n.startswith("moe[")})
    for ax, _s, models, unit in panels:
        ax.set_xlabel("power cap (W)")
        ax.set_ylabel(f"{unit} {what}")
        drawn = 0
        for name in _cap_order(models):
            pts = [(m, v) for m in models[name] if (v := value(m, metric)) is not None and v > 0
                   and (metric not in ENERGY_METRICS or energy_kind(m) != "none")]
            if not pts:
                continue
            colour, marker = _style(name, order)
            drawn += _draw_series(ax, [cap_of(m) or 0.0 for m, _ in pts], pts, metric, colour, marker,
                                  _pretty(name))
            if metric in ENERGY_METRICS and len(pts) > 1:
                best_m, best_v = max(pts, key=lambda mv: mv[1])
                ax.scatter([cap_of(best_m)], [best_v], marker="*", s=170, color=colour, edgecolors="#222222",
                           zorder=4, label=f"best cap {_pretty(name)}: {cap_of(best_m):g} W")
        if not drawn:
            _empty(ax, "energy not measured (meter: none)" if metric in ENERGY_METRICS else "no data")
            continue
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    return fig


def per_joule_vs_cap(frame: Frame) -> Figure:
    return _per_cap(frame, "inferences_per_joule", "Energy efficiency vs power cap (best cap starred)",
                    "per joule (/J)")


def per_second_vs_cap(frame: Frame) -> Figure:
    return _per_cap(frame, "inferences_per_second", "Throughput vs power cap", "per second (/s)")


def time_energy_front(frame: Frame) -> Figure:
    """Energy per inference against time per inference, one point per cap, each model's Pareto front joined
    (no other cap of that model is both faster and cheaper); hollow markers and dashed fronts for estimates."""
    fig, panels = _cap_panels(frame, "Time-energy trade-off across power caps, with each model's Pareto front")
    order = sorted({n[4:-1] for _, _, ms, _ in panels for n in ms if n.startswith("moe[")})
    for ax, _s, models, unit in panels:
        ax.set_xlabel(f"time per {unit[:-1]} (ms, log scale)")
        ax.set_ylabel(f"energy per {unit[:-1]} (mJ, log scale)")
        drawn = 0
        for name in _cap_order(models):
            pts = [(m, 1e3 / ips, 1e3 / ipj) for m in models[name] if energy_kind(m) != "none"
                   and (ips := value(m, "inferences_per_second")) and (ipj := value(m, "inferences_per_joule"))]
            colour, marker = _style(name, order)
            for kind, face, ls in (("measured", colour, "-"), ("estimate", "none", "--")):
                sub = [(m, t, e) for m, t, e in pts if energy_kind(m) == kind]
                if not sub:
                    continue
                suffix = " (estimate)" if kind == "estimate" else ""
                ax.scatter([t for _, t, _ in sub], [e for _, _, e in sub], marker=marker, s=40, facecolors=face,
                           edgecolors=colour, linewidths=1.4, zorder=3, label=_pretty(name) + suffix)
                for m, t, e in sub:
                    ax.annotate(f"{cap_of(m):g} W", (t, e), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                color=colour)
                fx, fy = _by_x(*zip(*((sub[i][1], sub[i][2]) for i in pareto_front([(t, e) for _, t, e in sub]))))
                ax.plot(fx, fy, ls, color=colour, lw=1.2, alpha=0.8, zorder=2)
                drawn += 1
        if not drawn:
            _empty(ax, "energy not measured (meter: none)")
            continue
        _loglog(ax, 7)
    return fig


# -- whole models: an MoE LLM against its dense siblings --------------------------------------------------------
WholeFacet = tuple[int, str, str]  # (context, dtype, moe impl): one panel of J/token against batch
SIBLING_STYLES = [("#222222", "s"), ("#8c8c8c", "D"), ("#1f77b4", "^"), ("#2ca02c", "v"), ("#9467bd", "P")]


def _set_models(rows: list[dict]) -> list[str]:
    """The set's models, its MoE first (the set's name), then its siblings by name."""
    moe = next((str(m.get("set")) for m in rows), "")
    return sorted({str(m.get("model")) for m in rows}, key=lambda n: (n != moe, n))


def _model_style(name: str, order: list[str]) -> tuple[str, str]:
    """The MoE red circles; each sibling its own colour and marker."""
    i = order.index(name) if name in order else len(order)
    return (MOE_COLOURS[0], "o") if i == 0 else SIBLING_STYLES[(i - 1) % len(SIBLING_STYLES)]


def _per_batch(frame: Frame, phase: str, title: str) -> Figure:
    """J/token against batch for every model of the set at one phase, one panel per (context, dtype, impl); the
    crossover over batch (MoE vs each sibling, from stable records) named in each panel's corner."""
    rows = [as_whole(m) for m in frame.wholes if m.get("phase") == phase and m.get("status") == "measured"]
    facets: list[WholeFacet] = sorted({(int(m.get("context") or 0), str(m.get("dtype")), str(m.get("impl")))
                                       for m in rows})
    fig, axes = _grid(len(facets), title)
    for ax in axes:
        ax.set_xlabel("batch (sequences per step, log scale)")
        ax.set_ylabel(f"whole model's energy per {'output' if phase == 'decode' else 'prompt'} token (J/token, log)")
    if not facets:
        _empty(axes[0], f"no {phase} measured for this model set")
    order = _set_models(frame.wholes)
    xos = [c for c in whole_crossovers(frame, "batch") if c.phase == phase]
    for ax, (context, dtype, impl) in zip(axes, facets):
        ax.set_title(f"{phase}, context {context}, {dtype}, MoE blocks: {impl}", fontsize=10)
        mine = [m for m in rows if (m.get("context"), m.get("dtype"), m.get("impl")) == (context, dtype, impl)]
        drawn = 0
        for name in order:
            pts = [(m, v) for m in mine if m.get("model") == name and (v := value(m, "joules_per_token"))
                   and energy_kind(m) != "none"]
            if pts:
                colour, marker = _model_style(name, order)
                label = name + (" (EXTRAPOLATED)" if any(m.get("extrapolated") for m, _ in pts) else "")
                drawn += _draw_series(ax, [m["batch"] for m, _ in pts], pts, "joules_per_token", colour, marker, label)
        if not drawn:
            _empty(ax, "energy not measured here (meter: none)")
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        bs = sorted({m["batch"] for m in mine})
        ax.set_xticks(bs, [str(b) for b in bs])
        notes = [f"MoE passes {c.vs}" + (f" at {c.power_limit_w:g} W" if c.power_limit_w is not None else "")
                 + f": {c.answer()}" for c in xos
                 if (c.fixed, c.dtype, c.strategy) == (f"context {context}", dtype, impl)]
        ax.text(0.02, 0.02, "\n".join(notes) or "no stable records here: no crossover", transform=ax.transAxes,
                fontsize=7, va="bottom", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper right")
    return fig


def whole_decode_joules_per_token(frame: Frame) -> Figure:
    return _per_batch(frame, "decode", "Decode: energy per output token vs batch, the MoE against its dense siblings")


def whole_prefill_joules_per_token(frame: Frame) -> Figure:
    return _per_batch(frame, "prefill", "Prefill: energy per prompt token vs batch, the MoE against its dense "
                                        "siblings")


def whole_time_energy_front(frame: Frame) -> Figure:
    """J/token against latency (decode: ITL p90; prefill: TTFT) for every stable configuration (batch, dtype,
    impl) of every model, one panel per phase and context (the workload), each model's Pareto front joined; flagged
    configurations drawn as grey crosses, kept out of the fronts."""
    contexts = sorted({int(m.get("context") or 0) for m in frame.wholes}) or [0]
    panels = [(phase, c) for phase in ("decode", "prefill") for c in contexts]
    fig, axes = _grid(len(panels), "Time-energy trade-off per configuration, with each model's Pareto front")
    order = _set_models(frame.wholes)
    for ax, (phase, context) in zip(axes, panels):
        key = "itl_p90_ms" if phase == "decode" else "ttft_ms"
        ax.set_title(f"{phase}, context {context}", fontsize=10)
        ax.set_xlabel(("inter-token latency p90" if phase == "decode" else "time to first token") + " (ms, log scale)")
        ax.set_ylabel("energy per token (J/token, log scale)")
        here = [m for m in frame.wholes if m.get("phase") == phase and m.get("context") == context]
        drawn = sum(_front(ax, *time_energy([m for m in here if m.get("model") == name], phase), name,
                           *_model_style(name, order)) for name in order)
        flagged = [(t, j) for m in map(as_whole, here) if unstable(m) is not None and (t := m.get(key)) and
                   (j := value(m, "joules_per_token"))]  # whole-model figures, as the fronts beside them
        if flagged:
            ax.scatter(*zip(*flagged), marker="x", color="#999999", s=30, zorder=2,
                       label=f"flagged: kept out ({len(flagged)})")
        if not drawn and not flagged:
            _empty(ax, f"no {phase} configuration with energy and latency measured")
            continue
        _loglog(ax, 7)
    return fig


def _front(ax: Axes, pts: list[tuple[dict, float, float]], front: list[int], name: str, colour: str,
           marker: str) -> int:
    """One model's configurations (hollow for estimates), each labelled with its batch; its front joined; 1 if
    anything was drawn."""
    if not pts:
        return 0
    est = all(energy_kind(m) == "estimate" for m, _, _ in pts)
    label = name + (" (estimate)" if est else "") + (" (EXTRAPOLATED)" if any(m.get("extrapolated") for m, _, _ in pts)
                                                    else "")
    ax.scatter([t for _, t, _ in pts], [j for _, _, j in pts], marker=marker, s=36, facecolors="none" if est else
               colour, edgecolors=colour, linewidths=1.3, zorder=3, label=label)
    for m, t, j in pts:
        ax.annotate(f"B{m.get('batch')}", (t, j), textcoords="offset points", xytext=(3, 3),
                    fontsize=6, color=colour)
    fx, fy = _by_x([pts[i][1] for i in front], [pts[i][2] for i in front])
    ax.plot(fx, fy, "--" if est else "-", color=colour, lw=1.2, alpha=0.8, zorder=2)
    return 1


# slug, title, function: the report draws them in this order, one image each
PLOTS: list[tuple[str, str, Callable[[Frame], Figure]]] = [
    ("inferences_per_joule", "Energy efficiency vs model size",
     partial(_series_plot, metric="inferences_per_joule", ylabel="inferences per joule (inferences/J, log scale)",
             title="Energy efficiency vs model size (crossover marked)")),
    ("inferences_per_second", "Throughput vs model size",
     partial(_series_plot, metric="inferences_per_second", ylabel="inferences per second (inferences/s, log scale)",
             title="Throughput vs model size (crossover marked)")),
    ("correct_per_joule", "Accuracy per joule vs model size",
     partial(_series_plot, metric="correct_per_joule", ylabel="correct inferences per joule (accuracy x inferences/J)",
             title="Accuracy per joule vs model size (crossover marked)")),
    ("average_power", "Average power per model", average_power_per_model),
    ("power_traces", "Power traces", power_traces),
    ("energy_latency", "Energy vs latency", energy_latency_scatter),
    ("ratio_vs_batch", "MoE/dense ratio vs batch size", ratio_vs_batch_size),
]

# the LLM-layer section's plots, drawn once per arch (on that arch's records), in this order
LAYER_PLOTS: list[tuple[str, str, Callable[[Frame], Figure]]] = [
    ("layer_tokens_per_joule", "Tokens per joule vs tokens per forward", layer_tokens_per_joule),
    ("layer_experts_touched", "Experts touched vs tokens per forward", layer_experts_touched),
    ("layer_roofline", "Roofline: achieved vs bound", layer_roofline),
]

# the power caps' section: drawn once, over every capped record, when the store holds more than one cap
CAP_PLOTS: list[tuple[str, str, Callable[[Frame], Figure]]] = [
    ("per_joule_vs_cap", "Inferences (tokens) per joule vs power cap", per_joule_vs_cap),
    ("per_second_vs_cap", "Inferences (tokens) per second vs power cap", per_second_vs_cap),
    ("time_energy_front", "Time-energy Pareto front across power caps", time_energy_front),
]

# the whole-model section's plots, drawn once per model set (an MoE and its dense siblings), in this order
WHOLE_PLOTS: list[tuple[str, str, Callable[[Frame], Figure]]] = [
    ("whole_decode_joules_per_token", "Decode: J per output token vs batch", whole_decode_joules_per_token),
    ("whole_prefill_joules_per_token", "Prefill: J per prompt token vs batch", whole_prefill_joules_per_token),
    ("whole_time_energy_front", "Time-energy Pareto front per configuration", whole_time_energy_front),
]

__all__ = ["CAP_PLOTS", "LAYER_PLOTS", "METRICS", "PLOTS", "WHOLE_PLOTS"]
