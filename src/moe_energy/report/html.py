"""The report's files: one self-contained HTML page (PNG plots embedded as base64) and a Markdown summary
beside its PNGs. Both carry the same tables; the crossover table comes first because it is the answer.

The page is a list of blocks (heading, table, note, image) rendered twice, as HTML and as Markdown: the seed's
section (sizes), then, when the store holds LLM layers, their section (tokens per forward) with one
sub-section of plots per arch, then, when it holds whole models, their section (the crossovers over batch and
context, the deadline selection, and per model set its records and plots), then, when the store holds more than
one power cap, the caps' section (the cap that maximises each model's inferences/J, and efficiency, speed and the
time-energy front against the cap), then the skipped points and the runs. Carbon and cost per million inferences
(tokens) are columns of the tables wherever the records carry them: estimates on the intensity and price given,
each cell saying which.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from matplotlib.figure import Figure

from ..energy.meter import faults
from ..errors import ConfigError
from ..measure.records import training_failure
from ..power.carbon import ESTIMATED
from ..storage.fileio import now_utc, replace_atomic
from .analysis import (
    ITL_DEADLINES_MS,
    METRICS,
    BestCap,
    Choice,
    Crossover,
    Frame,
    at_cap,
    best_caps,
    cap_of,
    cap_series,
    caps,
    crossovers,
    energy_kind,
    group_order,
    layer_crossovers,
    pairs,
    reference_cap,
    selections,
    stable,
    unstable,
    value,
    weights_format,
    whole_crossovers,
    whole_sets,
)
from .plots import CAP_PLOTS, LAYER_PLOTS, PLOTS, WHOLE_PLOTS

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows (already formatted text)
# A block of the page: ("h2"|"h3", text) | ("table", Table) | ("note", text) | ("image", slug, title)
Block = tuple

METHOD_NOTE = (
    "Crossover: the smallest total parameter count where the MoE's figure exceeds that of the dense model "
    "matched to its total parameters, interpolated between neighbouring sweep points with log(MoE / dense) "
    "linear in log10(params) (a straight line on the log-log plots, so the mark sits where the curves cross). "
    "The interval uses the repeats' spread: from the best case "
    "(MoE's best window vs dense's worst) to the worst case (MoE's worst vs dense's best). "
    "An estimated energy figure is never compared with a measured one."
)
LAYER_NOTE = (
    "LLM layers: one MoE feed-forward layer of each arch against the dense SwiGLU FFNs matched to its total and to "
    "its active parameters, at each number of tokens per forward (1: a decoding step; thousands: a prefill chunk); "
    "tokens are the inferences. Crossover over tokens: where the MoE's figure passes the total-matched FFN's, "
    "found exactly as the size crossover is (log ratio linear in log10(tokens), interval from the repeats). "
    "Bytes read per forward: the router, the experts the routing touched (counted on the device, read after each "
    "window) and any shared experts; a dense FFN reads all its weights. Bound: the slower of those bytes at "
    "`calibrate`'s copy bandwidth (memory) and the FLOPs at its GEMM rate (compute); 'of bound' is bound / "
    "achieved time. A copy both reads and writes, so a forward that only reads its weights can stream faster and "
    "a memory-bound figure can pass 100 %. A (model, token count) whose one forward would outlast --max-forward-s "
    "is skipped, with its bound in the reason. Whole-model figures would be extrapolated (attention and KV cache "
    "left out): none are drawn. Weights int8 (--weights int8): every model of the point holds int8 weight-only "
    "weights (per-channel fp32 scales, activations in the dtype; bytes read count 1 byte a weight), so int8 rows are "
    "compared among themselves only, never with the dtype's; their output error is ||y_int8 - y|| / ||y|| against "
    "the same weights in the dtype. Weights w8a8 (--weights w8a8): the same int8 weights, and each row of "
    "activations rounded to int8 on its own scale before each projection; a format of its own, compared likewise."
)


CAP_NOTE = (
    "Power caps: each capped point is measured whole under its cap (set before, read back after every window, "
    "the original limit restored after the point). The cap column is the cap asked; the records also keep the "
    "limit read back. Best cap: the one with the most inferences per joule (tokens per joule for LLM layers) for "
    "that model at that setting; estimated and measured energy are never compared. Time-energy front: energy per "
    "inference against time per inference over the caps; a point is on the front when no other cap of the same "
    "model is both faster and cheaper."
)
CARBON_NOTE = (
    "Carbon and cost: ESTIMATES, not measurements: energy per inference (raw, idle included) x the grid carbon "
    "intensity (g CO2e/kWh) and electricity price per kWh given to the sweep, each cell naming the figure used; "
    "'estimate of an estimate' where the energy itself is estimated (a TDP model)."
)


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]
    replaced: bool = False  # an earlier moe-energy report was in the directory: replaced, said so
    stale: list[Path] = field(default_factory=list)  # its plots this report does not draw: removed


def _num(v: float | None, spec: str = ",.1f") -> str:
    return "not measured" if v is None else f"{v:{spec}}"


def _accuracy(m: dict) -> str:
    failure = training_failure(m)
    return _num(value(m, "accuracy"), ".1%") + (f" ({failure}: accuracy meaningless)" if failure else "")


def _spread(m: dict, metric: str, spec: str) -> str:
    v = value(m, metric)
    if v is None:
        return "not measured"
    lo, hi = value(m, metric, "min"), value(m, metric, "max")
    text = f"{v:{spec}}"
    if lo is not None and hi is not None and (lo != v or hi != v):
        text += f" ({lo:{spec}}-{hi:{spec}})"
    return text


def _energy(m: dict, metric: str, spec: str) -> str:
    if energy_kind(m) == "none":
        return "not measured"
    text = _spread(m, metric, spec)
    return text + " (estimate)" if energy_kind(m) == "estimate" and text != "not measured" else text


def _cap(w: float | None) -> str:
    return "-" if w is None else f"{w:g}"


def crossover_table(xos: list[Crossover]) -> Table:
    capped = any(c.power_limit_w is not None for c in xos)
    head = ["batch size", "dtype", "strategy", "E/k", *(["power cap W"] if capped else []), "figure",
            "crossover (total params)", "energy", "points", "notes"]
    rows = []
    for c in xos:
        energy = c.energy or ("-" if c.metric not in ("inferences_per_joule", "correct_per_joule") else "not measured")
        rows.append([str(c.batch_size), str(c.dtype), str(c.strategy), str(c.ek),
                     *([_cap(c.power_limit_w)] if capped else []), METRICS[c.metric], c.answer(), energy,
                     str(c.n_points), "; ".join(c.notes)])
    return "Crossover: where MoE overtakes the total-matched dense model", head, rows


def _carbon_cell(m: dict | None, key: str) -> str:
    """A carbon or cost figure with the intensity or price it was built on, marked as the estimate it is."""
    v = None if m is None else m.get(key)
    if v is None:
        return "-"
    assert m is not None
    at = (f"{m.get('carbon_intensity_g_per_kwh'):g} g/kWh" if key == "co2e_g_per_million"
          else f"{m.get('price_per_kwh'):g}/kWh")
    return f"{v:.3g} at {at} " + ("(estimate of an estimate)" if m.get("carbon_basis") == ESTIMATED else "(estimate)")


def carbon_columns(records: list[dict], per: str) -> list[tuple[str, str]]:
    """(header, key) of the carbon and cost columns the records carry figures for; none otherwise."""
    cols = [(f"g CO2e per 1M {per} (estimate)", "co2e_g_per_million"), (f"cost per 1M {per} (estimate)",
                                                                         "cost_per_million")]
    return [(h, k) for h, k in cols if any(m.get(k) is not None for m in records)]


def points_table(frame: Frame) -> Table:
    capped = any(cap_of(m) is not None for m in frame.models)
    carbon = carbon_columns(frame.models, "inferences")
    head = ["point", "E/H/L/k", "batch", "dtype", *(["power cap W (read back)"] if capped else []), "model", "params",
            "active params", "held-out acc", "inferences/s", "avg W", "inferences/J", "correct inferences/J",
            "energy method", *[h for h, _ in carbon]]
    rows = []
    pts = {p["id"]: p for p in frame.points}
    for m in sorted(frame.models, key=lambda m: (m["total_params"] or 0, m["batch_size"] or 0, str(m["dtype"]),
                                                  m["point_id"], m.get("ordinal", 0))):
        p = pts.get(m["point_id"], {})
        acc = _accuracy(m)
        cpj = value(m, "correct_per_joule")
        rows.append([
            str(m["label"]), f"{p.get('experts')}/{p.get('hidden')}/{p.get('layers')}/{p.get('top_k')}",
            str(m["batch_size"]), str(m["dtype"]), *([_cap_read(m)] if capped else []), str(m["name"]),
            f"{m['params']:,}", f"{m['active_params']:,}", acc,
            _spread(m, "inferences_per_second", ",.0f"), _energy(m, "average_power_w", ",.1f"),
            _energy(m, "inferences_per_joule", ",.1f"),
            _correct_per_joule(m, cpj),
            str(m.get("energy_method")), *[_carbon_cell(m, k) for _, k in carbon],
        ])
    return "Every point measured (median of the repeats, spread in brackets)", head, rows


def _correct_per_joule(m: dict, cpj: float | None) -> str:
    """Correct inferences/J, '(estimate)' when it is one; a model whose training failed has none that means
    anything, which is not the same as none measured."""
    if energy_kind(m) != "none" and value(m, "inferences_per_joule") is not None and training_failure(m):
        return f"not comparable ({training_failure(m)})"
    if cpj is None or energy_kind(m) == "none":
        return "not measured"
    return f"{cpj:,.1f}" + (" (estimate)" if energy_kind(m) == "estimate" else "")


def _cap_read(m: dict) -> str:
    """The cap asked, and the limit read back where it differs (a driver's rounding, a clamp)."""
    cap = cap_of(m)
    if cap is None:
        return "-"
    key = "power_limit_w" if m.get("power_limit_requested_w") is not None else "cpu_power_limit_w"
    back = value(m, key)
    cpu = "" if key == "power_limit_w" else "CPU "
    return f"{cpu}{cap:g}" + ("" if back is None or abs(back - cap) <= 0.5 else f" (read {back:g})")


def comparison_table(frame: Frame) -> Table:
    """The blog's table: at each size, the MoE against the dense model of the same total size."""
    head = ["point", "total params", "batch", "dtype", "strategy", "MoE inferences/J", "dense inferences/J",
            "ratio", "MoE inferences/s", "dense inferences/s", "ratio", "MoE avg W", "dense avg W",
            "MoE acc", "dense acc"]
    rows = []
    for (b, dt, st, _ek, cap), ps in sorted(pairs(frame).items(), key=group_order):
        for p in ps:
            m, d = p.moe, p.dense
            comparable = energy_kind(m) == energy_kind(d) != "none"
            ipj_m, ipj_d = value(m, "inferences_per_joule"), value(d, "inferences_per_joule")
            ips_m, ips_d = value(m, "inferences_per_second"), value(d, "inferences_per_second")
            est = " (estimate)" if comparable and energy_kind(m) == "estimate" else ""
            rows.append([
                p.label + ("" if cap is None else f" @{_cap_read(m)} W"), f"{p.params:,}", str(b), str(dt), str(st),
                _energy(m, "inferences_per_joule", ",.1f"), _energy(d, "inferences_per_joule", ",.1f"),
                (f"{ipj_m / ipj_d:.3f}{est}" if comparable and ipj_m and ipj_d else "not comparable"),
                _spread(m, "inferences_per_second", ",.0f"), _spread(d, "inferences_per_second", ",.0f"),
                f"{ips_m / ips_d:.3f}" if ips_m and ips_d else "not measured",
                _energy(m, "average_power_w", ",.1f"), _energy(d, "average_power_w", ",.1f"),
                _accuracy(m), _accuracy(d),
            ])
    return "MoE vs the dense model of the same total size, at each point (ratio above 1: MoE better)", head, rows


def skipped_table(frame: Frame) -> Table:
    head = ["point", "total params", "batch", "dtype", "status", "reason"]
    rows = [[str(p["label"]), f"{p['total_params']:,}" if p["total_params"] else "-",
             "-" if p["batch_size"] is None else str(p["batch_size"]), str(p["dtype"]), p["status"], str(p["reason"])]
            for p in frame.skipped]
    return "Points skipped or failed", head, rows


# -- LLM layers -------------------------------------------------------------------------------------------
def layer_crossover_table(xos: list[Crossover]) -> Table:
    """Each layer group's crossover; a weights column where any group ran int8 (each within its own format)."""
    int8 = any(c.weights not in (None, c.dtype) for c in xos)
    head = ["arch", "routing", "dtype", *(["weights"] if int8 else []), "strategy", "figure",
            "crossover (tokens per forward)", "energy", "token counts", "notes"]
    rows = []
    for c in xos:
        energy = c.energy or ("-" if c.metric != "inferences_per_joule" else "not measured")
        figure = METRICS[c.metric].replace("inferences", "tokens")
        rows.append([str(c.arch), str(c.routing), str(c.dtype), *([str(c.weights)] if int8 else []), str(c.strategy),
                     figure, c.answer(), energy, str(c.n_points), "; ".join(c.notes)])
    return "LLM layers: where the MoE passes the total-matched dense FFN, over tokens per forward", head, rows


def _j1k(m: dict | None) -> str:
    """J per 1,000 tokens, median (spread of the repeats), '(estimate)' when it is one; why when there is none."""
    if m is None:
        return "-"
    if m.get("status") in ("skipped", "failed"):
        return f"{m['status']}: {str(m.get('skipped') or '').split(' (')[0]}"
    ipj = value(m, "inferences_per_joule")
    if ipj is None or ipj <= 0 or energy_kind(m) == "none":
        return "not measured"
    text = f"{1000 / ipj:,.4g}"
    lo, hi = value(m, "inferences_per_joule", "max"), value(m, "inferences_per_joule", "min")
    if lo and hi and (lo != ipj or hi != ipj):
        text += f" ({1000 / lo:,.4g}-{1000 / hi:,.4g})"
    return text + (" (estimate)" if energy_kind(m) == "estimate" else "")


def _bound(m: dict) -> str:
    frac = value(m, "fraction_of_roofline")
    if not m.get("bound") or frac is None:
        return "not calibrated" if m.get("status") == "measured" else "-"
    return f"{m['bound']} ({_percent(frac)})"


def _percent(frac: float) -> str:
    """A fraction as a percentage, whole from 10 % up, else two significant digits: 0.0216 % is not '0%'."""
    return f"{frac:.0%}" if frac >= 0.1 else f"{frac * 100:.2g}%"


def layer_tokens_table(frame: Frame) -> Table:
    """Per arch, routing, dtype, weights format, token count (and cap): J per 1,000 tokens of the MoE layer and
    both dense FFNs of that format; where any ran int8, a weights column and each model's output error."""
    capped = any(cap_of(m) is not None for m in frame.layers)
    int8 = any(m.get("weights") for m in frame.layers)
    carbon = carbon_columns(frame.layers, "tokens")
    head = ["arch", "routing", "dtype", *(["weights"] if int8 else []), "tokens per forward",
            *(["power cap W"] if capped else []), "MoE", "MoE J/1k tokens", "dense (total) J/1k tokens",
            "dense (active) J/1k tokens", "experts touched", "MoE MiB read/forward", "MoE bound (of it)",
            "dense (total) bound (of it)", *([f"{ERROR_HEAD}: MoE / dense (total) / dense (active)"] if int8 else []),
            *[f"{h}: MoE / dense (total) / dense (active)" for h, _ in carbon]]
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for m in frame.layers:
        key = (str(m.get("arch")), str(m.get("routing")), str(m["dtype"]), weights_format(m),
               m.get("tokens_per_forward") or 0, cap_of(m) or 0.0)
        cells.setdefault(key, {}).setdefault("moe" if m["kind"] == "moe" else str(m.get("match")), []).append(m)
    rows = []
    for key in sorted(cells):
        c = cells[key]
        total, active = (c.get(k, [None])[0] for k in ("total", "active"))
        for moe in c.get("moe") or [None]:
            touched = moe.get("experts_touched") if moe else None
            nbytes = moe.get("weight_bytes_read_per_forward") if moe else None
            rows.append([*key[:3], *([key[3]] if int8 else []), str(key[4]),
                         *([_cap(key[5] or None)] if capped else []), _base_name(moe),
                         _j1k(moe), _j1k(total), _j1k(active),
                         "-" if touched is None else f"{touched:g} of {moe.get('point_experts')}",
                         "-" if nbytes is None else f"{nbytes / 2**20:,.4g}", _bound(moe) if moe else "-",
                         _bound(total) if total else "-",
                         *([" / ".join(_output_error(r) for r in (moe, total, active))] if int8 else []),
                         *[" / ".join(_carbon_cell(r, k) for r in (moe, total, active)) for _, k in carbon]])
    return ("LLM layers: J per 1,000 tokens per arch and token count (1,000 / the median tokens/J of the repeats, "
            "their spread in brackets)"), head, rows


ERROR_HEAD = "weights output error vs the dtype's"


def _output_error(m: dict | None) -> str:
    """An int8 record's output error against the same weights in the dtype, as a percentage; '-' for the dtype's."""
    err = None if m is None else value(m, "weights_output_error")
    return "-" if err is None else f"{err:.2%}"


def _base_name(m: dict | None) -> str:
    return "-" if m is None else str(m["name"]).split("@")[0]


WHOLE_NOTE = (
    "Whole models: each MoE LLM and the dense models it is compared with, built from their published shapes (random "
    "weights), at every batch B and context L. Prefill: B prompts of L tokens, one forward; J per prompt token, time "
    "to first token (TTFT). Decode: B sequences, one new token each per step against a KV cache held at L; J per "
    "output token, inter-token latency (ITL) p50/p90. Stability (ML.ENERGY's rule): a window whose batch shrank or "
    "whose steady state was shorter than the window is not an answer; a decode step here holds its batch and its "
    "cache by construction, so a record is kept out of the crossovers and the selection when any of its windows was "
    "flagged (too short, a zero or impossible reading, a trace far from its counter) or failed; the estimate's label "
    "is not a flag. Crossover over batch (or context): where the MoE's tokens/J passes the sibling's, interpolated "
    "as the size crossover is, the interval from the repeats. Selection: for each model, phase and context, the "
    "configuration (batch, dtype, MoE blocks) with the lowest J/token whose decode ITL p90 meets the deadline "
    "(--itl-deadline-ms); a prefill has no inter-token latency, so its row has no deadline. When only the first N "
    "layers of a model were built, its record's figures are of those N; the crossovers, the selection and the plots "
    "compare whole models, so they use its figures extrapolated (time and energy per token x all layers' parameters "
    "/ the N built's) and say EXTRAPOLATED."
)


def whole_crossover_table(xos: list[Crossover]) -> Table:
    """Each MoE against each sibling, per phase, along batch and along context."""
    capped = any(c.power_limit_w is not None for c in xos)
    head = ["MoE", "vs", "phase", "along", "at", "dtype", "MoE blocks", *(["power cap W"] if capped else []),
            "crossover (MoE's tokens/J passes)", "energy", "points", "notes"]
    rows = [[str(c.model), str(c.vs), str(c.phase), c.axis, str(c.fixed), str(c.dtype), str(c.strategy),
             *([_cap(c.power_limit_w)] if capped else []), c.answer(), c.energy or "not measured", str(c.n_points),
             "; ".join(c.notes)] for c in xos]
    return "Whole models: where the MoE uses less energy per token than each dense sibling (stable records)", head, \
        rows


def _ms(v: object) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:,.3g}"


def selection_table(choices: list[Choice]) -> Table:
    """ML.ENERGY's answer: each model's lowest-J/token configuration meeting each ITL deadline."""
    capped = any(c.record is not None and cap_of(c.record) is not None for c in choices)  # the cap is a setting too
    head = ["MoE set", "model", "phase", "context", "ITL p90 deadline ms", "batch", "dtype", "MoE blocks",
            *(["power cap W"] if capped else []), "J/token", "tokens/s", "ITL p90 ms", "TTFT ms",
            "meeting / stable configurations", "flagged (kept out)", "energy"]
    rows = []
    for c in choices:
        m = c.record
        none = "none meets it" if c.candidates else "no stable record"  # a prefill has no deadline to miss
        pick = [none, "-", "-"] if m is None else [str(m.get("batch")), str(m.get("dtype")),
                                                   str(m.get("impl") if m.get("kind") == "moe" else "-")]
        pick += ["-" if m is None else _cap(cap_of(m))] if capped else []
        est = (" (estimate)" if m is not None and c.energy == "estimate" else "") + \
            (" (EXTRAPOLATED)" if m is not None and m.get("extrapolated") else "")
        rows.append([c.set, c.model, c.phase, str(c.context), "none (prefill)" if c.deadline_ms is None else
                     f"{c.deadline_ms:g}", *pick, "-" if m is None else f"{value(m, 'joules_per_token'):.4g}{est}",
                     "-" if m is None else _num(value(m, "inferences_per_second"), ",.1f"),
                     "-" if m is None else _ms(m.get("itl_p90_ms")), "-" if m is None else _ms(m.get("ttft_ms")),
                     f"{c.meeting} / {c.candidates}", str(c.flagged), c.energy])
    return "Whole models: the lowest energy per token meeting each inter-token deadline (ML.ENERGY's selection)", \
        head, rows


def whole_tokens_table(recs: list[dict]) -> Table:
    """Every record of a set: its per-token figures, its layers, and whether it was kept out."""
    capped = any(cap_of(m) is not None for m in recs)
    head = ["phase", "context", "batch", "dtype", "MoE blocks", *(["power cap W"] if capped else []), "model", "layers",
            "J/token", "tokens/s", "TTFT ms", "ITL p50 ms", "ITL p90 ms", "whole model J/token (extrapolated)",
            "kept out because"]
    rows = []
    order = {"prefill": 0, "decode": 1}
    for m in sorted(recs, key=lambda m: (order.get(str(m.get("phase")), 2), m.get("context") or 0,
                                         m.get("batch") or 0, str(m.get("dtype")), str(m.get("impl")),
                                         -1.0 if cap_of(m) is None else cap_of(m),
                                         m.get("model") != m.get("set"), str(m.get("model")))):
        x = m.get("whole_model_extrapolated")
        j = value(m, "joules_per_token")
        rows.append([str(m.get("phase")), str(m.get("context")), str(m.get("batch")), str(m.get("dtype")),
                     str(m.get("impl")), *([_cap(cap_of(m))] if capped else []), str(m.get("model")),
                     f"{m.get('layers_measured')} of {m.get('layers_total')}",
                     "not measured" if j is None or energy_kind(m) == "none" else
                     f"{j:.4g}" + (" (estimate)" if energy_kind(m) == "estimate" else ""),
                     _num(value(m, "inferences_per_second"), ",.1f"), _ms(m.get("ttft_ms")),
                     _ms(m.get("itl_p50_ms")), _ms(m.get("itl_p90_ms")),
                     "-" if not isinstance(x, dict) or x.get("joules_per_token") is None else
                     f"{x['joules_per_token']:.4g} (EXTRAPOLATED)", unstable(m) or "-"])
    return "Every configuration measured (median of the repeats)", head, rows


def whole_tables(frame: Frame, deadlines: tuple[float, ...] = ITL_DEADLINES_MS) -> list[Table]:
    """The whole-model answers over every set (none without whole models): crossovers, then the selection."""
    if not frame.wholes:
        return []
    return [whole_crossover_table(whole_crossovers(frame, "batch") + whole_crossovers(frame, "context")),
            selection_table(selections(frame, deadlines))]


def best_cap_table(best: list[BestCap]) -> Table:
    """One line per model and setting: the cap that maximises its inferences/J (tokens/J), and what it gains."""
    carbon = carbon_columns([b.record for b in best], "inferences (tokens)")
    head = ["setting", "model", "best cap W", "inferences/J (tokens/J) there", "inferences/s (tokens/s) there",
            "vs the highest cap (inferences/J)", "caps compared", "energy", *[h for h, _ in carbon]]
    rows = []
    for b in best:
        ipj, top = value(b.record, "inferences_per_joule"), value(b.highest, "inferences_per_joule")
        gain = f"x{ipj / top:.3f} vs {cap_of(b.highest):g} W" if ipj and top and b.record is not b.highest else \
            "it is the highest"
        est = " (estimate)" if b.energy == "estimate" else ""
        rows.append([b.setting, b.model, f"{b.cap:g}", _spread(b.record, "inferences_per_joule", ",.4g") + est,
                     _spread(b.record, "inferences_per_second", ",.4g"), gain, str(b.n_caps), b.energy,
                     *[_carbon_cell(b.record, k) for _, k in carbon]])
    return "Power caps: the cap that maximises each model's inferences per joule", head, rows


def environment_table(frame: Frame) -> Table:
    rows = []
    for r in frame.runs:
        env = json.loads(r["environment_json"]) if r.get("environment_json") else {}
        meter = json.loads(r["meter_json"]) if r.get("meter_json") else {}
        rows.append([r["run_id"][:8], r["created_utc"], str(r.get("grid_name")), str(r.get("shard") or "-"),
                     str(env.get("device_name")), str(env.get("torch")),
                     f"{meter.get('name')} ({meter.get('method')})" if meter else "-",
                     str(meter.get("notice") or "")])
    return "Runs", ["run", "started (UTC)", "grid", "shard", "device", "torch", "energy meter", "meter notice"], rows


def has_seed(frame: Frame) -> bool:
    """Whether the seed's section is drawn: when it has models, or when nothing else would be (an empty store's
    report still shows every plot, each saying why it is empty)."""
    return bool(frame.models) or not (frame.layers or frame.wholes)


def seed_tables(frame: Frame) -> list[Table]:
    """The seed's section's tables (none when the store holds only LLM layers): crossover, comparison, points."""
    return [crossover_table(crossovers(frame)), comparison_table(frame), points_table(frame)] if has_seed(frame) \
        else []


def layer_tables(frame: Frame) -> list[Table]:
    """The LLM section's tables (none without LLM layers): the crossover over tokens, J per 1,000 tokens."""
    return [layer_crossover_table(layer_crossovers(frame)), layer_tokens_table(frame)] if frame.layers else []


def answer_tables(frame: Frame, deadlines: tuple[float, ...] = ITL_DEADLINES_MS) -> list[Table]:
    """What `moe-energy report` prints: each section's crossover, the LLM layers' per-token table, the whole models'
    crossovers and deadline selection, and with several power caps the best cap per model."""
    return seed_tables(frame)[:1] + layer_tables(frame) + whole_tables(frame, deadlines) + \
        ([best_cap_table(best_caps(frame))] if cap_series(frame) else [])


def png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _html_table(t: Table) -> str:
    title, head, rows = t
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p class='none'>none</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    title, head, rows = t
    if not rows:
        return f"## {title}\n\nnone\n"
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;color:#222;
background:#fff;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
.note{background:#f7f7e8;border-left:4px solid #c9c26b;padding:.5em 1em;font-size:.9em}.none{color:#777}
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _whole_blocks(frame: Frame, drawn: Frame, at: str, images: dict[str, bytes],
                  deadlines: tuple[float, ...]) -> list[Block]:
    """The whole models' section: the answers over every set, then per set (an MoE and its siblings) its records'
    table (every cap) and each of WHOLE_PLOTS (``drawn``: one cap, said in ``at``, when there are several)."""
    blocks: list[Block] = [("h2", "Whole models: energy per token, the MoE against its dense siblings"),
                           ("note", WHOLE_NOTE)]
    blocks += [("table", t) for t in whole_tables(frame, deadlines)]
    if at:
        blocks.append(("note", f"The tables hold every power cap; the plots of each set are {at}."))
    plotted = whole_sets(drawn)
    for name, recs in whole_sets(frame).items():
        ok, flagged = stable(recs)
        blocks += [("h3", f"{name} against {', '.join(sorted({str(m['model']) for m in recs} - {name}))}"),
                   ("note", f"{len(recs)} configuration(s): {len(ok)} stable with energy, {flagged} flagged and kept "
                            "out of the answers"), ("table", whole_tokens_table(recs))]
        if name not in plotted:
            continue
        sub = replace(drawn, wholes=plotted[name])
        for slug, title, fn in WHOLE_PLOTS:
            key = f"{slug}-{_slug(name)}"
            images[key] = png(fn(sub))
            blocks.append(("image", key, f"{name}: {title}"))
    return blocks


def _draw(frame: Frame, deadlines: tuple[float, ...] = ITL_DEADLINES_MS) -> tuple[list[Block], dict[str, bytes]]:
    """Every plot as a PNG, and the blocks of the page in order (tables and notes between them). With several
    caps the plots along size and tokens are drawn at one (``reference_cap``), the caps' own section compares
    them; the tables hold every cap."""
    images: dict[str, bytes] = {}
    blocks: list[Block] = []
    several = len(caps(frame)) > 1
    drawn = at_cap(frame, reference_cap(frame)) if several else frame
    at = "" if not several else ("drawn from the uncapped points" if reference_cap(frame) is None else
                                 f"drawn at the {reference_cap(frame):g} W cap")
    if any(m.get("carbon_basis") for m in (*frame.models, *frame.layers)):
        blocks.append(("note", CARBON_NOTE))
    if has_seed(frame):
        t = seed_tables(frame)
        blocks += [("table", t[0]), ("note", METHOD_NOTE), ("table", t[1])]
        if at:
            blocks.append(("note", f"The plots along model size are {at}; the power-cap section compares caps."))
        for slug, title, fn in PLOTS:
            images[slug] = png(fn(drawn))
            blocks.append(("image", slug, title))
        blocks.append(("table", t[2]))
    if frame.layers:
        blocks += [("h2", "LLM MoE layers: energy per token against tokens per forward"), ("note", LAYER_NOTE)]
        blocks += [("table", t) for t in layer_tables(frame)]
        if at:
            blocks.append(("note", f"The plots against tokens per forward are {at}."))
        for arch in sorted({str(m.get("arch")) for m in drawn.layers}):
            sub = replace(drawn, layers=[m for m in drawn.layers if str(m.get("arch")) == arch])
            blocks.append(("h3", f"{arch}: " + ", ".join(title.lower() for _s, title, _f in LAYER_PLOTS)))
            for slug, title, fn in LAYER_PLOTS:
                name = f"{slug}-{_slug(arch)}"
                images[name] = png(fn(sub))
                blocks.append(("image", name, f"{arch}: {title}"))
    if frame.wholes:
        blocks += _whole_blocks(frame, drawn, at, images, deadlines)
    if cap_series(frame):  # the seed's or the layers' settings measured at more than one cap
        blocks += _cap_blocks(frame, images)
    blocks += [("table", skipped_table(frame)), ("table", environment_table(frame))]
    return blocks, images


def _cap_blocks(frame: Frame, images: dict[str, bytes]) -> list[Block]:
    """The power caps' section: the best cap per model, then each of CAP_PLOTS over every capped record."""
    blocks: list[Block] = [("h2", "Power caps: efficiency, speed and the time-energy trade-off"), ("note", CAP_NOTE),
                           ("table", best_cap_table(best_caps(frame)))]
    for slug, title, fn in CAP_PLOTS:
        images[slug] = png(fn(frame))
        blocks.append(("image", slug, title))
    return blocks


def _html(block: Block, images: dict[str, bytes]) -> str:
    kind = block[0]
    if kind == "table":
        return _html_table(block[1])
    if kind == "note":
        return f"<p class='note'>{html.escape(block[1])}</p>"
    if kind in ("h2", "h3"):
        return f"<{kind}>{html.escape(block[1])}</{kind}>"
    slug, title = block[1], block[2]
    b64 = base64.b64encode(images[slug]).decode("ascii")
    return (f"<figure id='{slug}'><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _md(block: Block) -> str:
    kind = block[0]
    if kind == "table":
        return _md_table(block[1])
    if kind == "note":
        return f"{block[1]}\n"
    if kind in ("h2", "h3"):
        return f"{'#' * int(kind[1])} {block[1]}\n"
    return f"![{block[2]}](plots/{block[1]}.png)\n"


def window_warnings(frame: Frame) -> str | None:
    """How many of the measured records' windows the meter or the clock flagged (too short, other processes busy, a
    trace far from its counter, ...) or that failed, each kind of flag once with its count; None when none was.
    The seed's and the LLM layers' figures include flagged windows (a failed one is left out of every figure);
    the whole models' answers keep a record with any out."""
    windows = [w for m in (*frame.models, *frame.layers, *frame.wholes) for w in m.get("windows") or []
               if isinstance(w, dict)]
    kinds: dict[str, list] = {}  # the flag with its numbers blanked -> [its first wording, windows carrying it]
    flagged = failed = 0
    for w in windows:
        failed += bool(w.get("failed"))
        found = faults(w.get("flags") or [])
        flagged += bool(found)
        for f in dict.fromkeys(found):
            kinds.setdefault(re.sub(r"\d+(\.\d+)?", "#", f), [f, 0])[1] += 1
    if not (flagged or failed):
        return None
    text = f"{flagged} of {len(windows)} measurement windows carry warnings"
    if kinds:
        text += " (" + "; ".join(f"{n}x '{f}'" + (" and the like" if n > 1 else "")
                                 for f, n in sorted(kinds.values(), key=lambda fn: -fn[1])) + ")"
    text += (": the size and token tables, crossovers and plots include those windows; the whole models' answers keep "
             "a record with any out. Read such figures with care, or measure again (longer --duration, an idle host)")
    if failed:
        text += f". {failed} window(s) FAILED and were left out of every figure"
    return text + "."


def _warnings(frame: Frame) -> tuple[list[str], str]:
    methods = sorted(frame.methods())
    warn = []
    if "estimate" in methods:
        warn.append("Some energy figures are estimates (a TDP model, not a reading): hollow markers, hatched bars "
                    "and '(estimate)' mark them; they are never compared with measured ones.")
    if "none" in methods:
        warn.append("Some models have no energy figure (meter: none); only their speed is compared.")
    flagged = window_warnings(frame)
    if flagged:
        warn.append(flagged)
    headline = f"{len(frame.points)} point(s) measured, {len(frame.skipped)} skipped or failed; energy methods: " \
               f"{', '.join(methods) or 'none'}."
    return warn, headline


TITLE = "moe-energy report: when does a Mixture of Experts use less energy per inference?"
HTML_HEAD = "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>moe-energy report</title>"
PLOT_LINK = re.compile(r"\]\(plots/([A-Za-z0-9._-]+\.png)\)")


def earlier_report(out_dir: str | Path) -> list[str] | None:
    """The plots (file names) an earlier moe-energy report in ``out_dir`` links, or None when there is none; a
    report.html or report.md there that moe-energy did not write is a one-line ConfigError: never replaced."""
    out = Path(out_dir)
    found = None
    for name, head in (("report.html", HTML_HEAD), ("report.md", f"# {TITLE}\n")):
        p = out / name
        try:
            with p.open("rb") as fh:  # the page's head says whose it is; the summary's links name its plots
                text = (fh.read() if name == "report.md" else fh.read(len(HTML_HEAD))).decode("utf-8", "replace")
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR):  # none there (writing says why not)
                continue
            text = ""  # there, but not readable as ours (a directory, no permission): never replaced
        if not text.startswith(head):
            raise ConfigError(f"--out {out}: {p} is not a moe-energy report, and is not replaced; choose another "
                              "directory")
        found = found or []
        if name == "report.md":
            found += PLOT_LINK.findall(text)
    return found


def write_report(frame: Frame, out_dir: str | Path, db: str | Path,
                 deadlines: tuple[float, ...] = ITL_DEADLINES_MS) -> ReportFiles:
    """Draw every plot, then write report.html (self-contained) and report.md with plots/*.png; ``deadlines`` are
    the inter-token deadlines (ms) of the whole models' selection."""
    out = Path(out_dir)
    earlier = earlier_report(out)  # a foreign report.html / report.md is refused before anything is drawn
    (out / "plots").mkdir(parents=True, exist_ok=True)
    created = now_utc()
    blocks, images = _draw(frame, deadlines)
    warn, headline = _warnings(frame)
    parts = [f"{HTML_HEAD}<style>{CSS}</style></head><body>", f"<h1>{html.escape(TITLE)}</h1>",
             f"<p>Generated {html.escape(created)} from <code>{html.escape(str(db))}</code>. "
             f"{html.escape(headline)}</p>"]
    parts += [f"<p class='note'>{html.escape(w)}</p>" for w in warn]
    parts += [_html(b, images) for b in blocks]
    parts.append("</body></html>")
    md = [f"# {TITLE}", "", f"Generated {created} from `{db}`. {headline}", ""]
    md += [f"> {w}\n" for w in warn]
    md += [_md(b) for b in blocks]
    paths = []
    for slug, data in images.items():
        p = out / "plots" / f"{slug}.png"
        replace_atomic(p, data)
        paths.append(p)
    html_path, md_path = out / "report.html", out / "report.md"
    replace_atomic(html_path, "".join(parts).encode("utf-8"))
    replace_atomic(md_path, "\n".join(md).encode("utf-8"))
    drawn = {p.name for p in paths}
    stale = [out / "plots" / n for n in dict.fromkeys(earlier or []) if n not in drawn]
    for p in stale:  # the earlier report's own plots, of figures this one does not hold: never left beside it
        p.unlink(missing_ok=True)
    return ReportFiles(html_path, md_path, paths, earlier is not None, stale)
