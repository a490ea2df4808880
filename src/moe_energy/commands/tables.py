"""The results table of every `run` (the seed's models or an LLM layer, one process or an expert-parallel job),
driven by columns, and the lines printed under it. Read only from the results document.

A column is a header and a cell; a table is the columns its document calls for (``columns``): the workload's
figures (per inference for the seed, per token for an LLM layer), the job's per-rank energy and all-to-all on an
expert-parallel run, and the power caps' and carbon's where a run has them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from ..energy.meter import faults
from ..measure.records import training_failure, training_note
from ..models.quant import describe
from ..power.carbon import unit
from ..runner.layer import ERROR_ROWS
from . import console, fmt
from .power import power_columns, power_lines

LEFT = ("model", "energy method", "method", "experts touched", "energy J (per rank)")


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]  # a measured record's cell, escaped


def _si(v: float) -> str:
    """3 significant digits with a k/M/G suffix: keeps a min-max range narrow enough for the table."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def spread(m: dict, key: str, spec: str, short: Callable[[float], str] = _si) -> str:
    """'median [min-max]' when the repeats differ, else the median alone; 'not measured' for None."""
    med, lo, hi = m.get(key), m.get(f"{key}_min"), m.get(f"{key}_max")
    if med is None:
        return "not measured"
    if lo is None or hi is None or m.get("repeats", 1) < 2 or (short is not _si and lo == hi):
        return fmt(med, spec)
    return f"{fmt(med, spec)} [{short(lo)}-{short(hi)}]"


def _g3(v: float) -> str:
    return f"{v:.3g}"


def estimated(m: dict, text: str, v: object) -> str:
    """``text`` marked '(estimate)' when the record's energy is the estimate model's and a figure is shown."""
    est = m.get("energy_is_estimate") or m.get("energy_method") == "estimate"
    return text + (" (estimate)" if est and v is not None else "")


def not_measured(m: dict) -> str:
    """Why a model has no figures: 'skipped: <reason>' (it could not fit) or 'failed: <error>' (it broke)."""
    return m["skipped"] if m.get("status") == "failed" else f"skipped: {m['skipped']}"


def _touched(m: dict, experts: int) -> str:
    if m.get("kind") != "moe":
        return "all weights"
    return "-" if m.get("experts_touched") is None else f"{m['experts_touched']:g} of {experts}"


def _per_rank_energy(m: dict) -> str:
    p = m["parallel"]
    return f"{fmt(m['energy_j'], ',.1f')} ({' + '.join(fmt(j, ',.1f') for j in p['per_rank_joules'])})"


def _all_to_all(m: dict) -> str:
    p = m["parallel"]
    return f"{p['all_to_all_seconds']:.3f} ({p['all_to_all_share_of_window']:.0%})" if "all_to_all_seconds" in p \
        else "none (data-parallel)"


def _all_to_all_mb(m: dict) -> str:
    p = m["parallel"]
    return fmt(p["all_to_all_bytes"] / 1e6, ",.2f") if "all_to_all_bytes" in p else "-"


def _acc(m: dict) -> str:
    failure = training_failure(m)
    return fmt(m["accuracy"], ".1%") + (f" ({failure}: meaningless)" if failure else "")


NAME = Column("model", lambda m: escape(m["name"].split("@T=")[0]))
PARAMS = Column("params", lambda m: f"{m['params']:,}")
TOKENS = Column("T", lambda m: str(m["tokens_per_forward"]))
SEED = [
    NAME, PARAMS, Column("active params", lambda m: f"{m['active_params']:,}"),
    Column("train acc", lambda m: fmt(m["train"].get("train_accuracy"), ".1%")),  # final weights, not the running
    Column("held-out acc", _acc),
    Column("inferences/s", lambda m: escape(spread(m, "inferences_per_second", ",.0f"))),
    Column("inferences/J", lambda m: estimated(m, escape(spread(m, "inferences_per_joule", ",.1f")),
                                               m["inferences_per_joule"])),
    Column("dynamic inferences/J", lambda m: estimated(m, escape(spread(m, "dynamic_inferences_per_joule", ",.1f")),
                                                       m.get("dynamic_inferences_per_joule"))),
    Column("avg W", lambda m: estimated(m, fmt(m["average_power_w"], ".1f"), m["average_power_w"])),
    Column("energy method", lambda m: escape(m["energy_method"])),
    Column("p50 ms/batch", lambda m: fmt(m["latency_p50_ms"], ".3f")),
]
SEED_JOB = [
    NAME, PARAMS, Column("held-out acc", _acc),
    Column("inferences/s", lambda m: fmt(m["inferences_per_second"])),
    Column("inferences/J", lambda m: fmt(m["inferences_per_joule"], ",.1f")),
    Column("energy J (per rank)", _per_rank_energy), Column("energy method", lambda m: escape(m["energy_method"])),
    Column("all-to-all s (share)", _all_to_all), Column("all-to-all MB", _all_to_all_mb),
    Column("p50 ms/batch", lambda m: fmt(m["latency_p50_ms"], ".3f")),
]


def layer_columns(experts: int) -> list[Column]:
    return [
        NAME, TOKENS, Column("tokens/s", lambda m: spread(m, "inferences_per_second", ",.1f", _g3)),
        Column("tokens/J", lambda m: spread(m, "inferences_per_joule", ",.2f", _g3)
               + (" (estimate)" if m.get("energy_is_estimate") and m.get("inferences_per_joule") else "")),
        Column("J/1k tokens", lambda m: _per_token(m, "joules_per_1k_tokens", ",.3f")),
        Column("avg W", lambda m: fmt(m.get("average_power_w"), ".1f")
               + (" (estimate)" if m.get("energy_is_estimate") and m.get("average_power_w") else "")),
        Column("method", lambda m: escape(m["energy_method"])),
        Column("experts touched", lambda m: _touched(m, experts)),
        Column("load max/mean", lambda m: "-" if m.get("expert_load_max_over_mean") is None
               else f"{m['expert_load_max_over_mean']:.2f}"),
        Column("p50 ms", lambda m: fmt(m.get("latency_p50_ms"), ".3f")),
    ]


def layer_job_columns(experts: int) -> list[Column]:
    return [
        NAME, TOKENS, Column("tokens/s", lambda m: fmt(m["tokens_per_second"], ",.1f")),
        Column("tokens/J", lambda m: fmt(m["tokens_per_joule"], ",.2f")),
        Column("J/1k tokens", lambda m: fmt(m["joules_per_1k_tokens"], ",.3f")),
        Column("energy J (per rank)", _per_rank_energy), Column("energy method", lambda m: escape(m["energy_method"])),
        Column("experts touched", lambda m: _touched(m, experts)),
        Column("all-to-all s (share)", _all_to_all), Column("all-to-all MB", _all_to_all_mb),
        Column("p50 ms", lambda m: fmt(m["latency_p50_ms"], ".3f")),
    ]


def _per_token(m: dict, key: str, spec: str) -> str:
    return fmt(m.get(key), spec) + (" (estimate)" if m.get("energy_is_estimate") and m.get(key) is not None else "")


WHOLE = [
    Column("model", lambda m: escape(m["model"])), Column("phase", lambda m: m["phase"]),
    Column("B", lambda m: str(m["batch"])), Column("L", lambda m: str(m["context"])),
    Column("tokens/s", lambda m: spread(m, "inferences_per_second", ",.1f", _g3)),
    Column("J/token", lambda m: _per_token(m, "joules_per_token", ".4g")),
    Column("tokens/J", lambda m: _per_token(m, "tokens_per_joule", ",.2f")),
    Column("TTFT or ITL p50 ms", lambda m: fmt(m.get("ttft_ms") if m["phase"] == "prefill" else m.get("itl_p50_ms"),
                                             ",.2f")),
    Column("ITL p90 ms", lambda m: fmt(m.get("itl_p90_ms"), ",.2f") if m["phase"] == "decode" else "-"),
    Column("avg W", lambda m: _per_token(m, "average_power_w", ".1f")),
    Column("energy method", lambda m: escape(m["energy_method"])),
    Column("layers", lambda m: f"{m['layers_measured']} of {m['layers_total']}"),
]


def columns(doc: dict) -> tuple[str, list[Column], int, int]:
    """(title, columns, leading cells a skipped row keeps, where its reason goes) of a results document: its
    workload's figures, the job's where it ran on ranks, the power caps' and carbon's where it has them."""
    reps = max((m.get("repeats", 1) for m in doc["models"]), default=1)
    env, dtype, par = doc["environment"], doc["options"]["dtype"], doc.get("parallel")
    if doc.get("family") == "whole_model":
        title = (f"moe-energy whole models ({env['device_name']}, {dtype}, MoE blocks: {doc['moe_impl']}); per "
                 f"token, median [min-max] of {reps} window(s); prefill: prompt tokens, decode: output tokens")
        cols, lead, at = WHOLE, 4, 4
    elif doc.get("family") == "llm_layer":
        a, mode = doc["arch"], doc["routing"]["mode"]
        if par:
            title = (f"moe-energy {a['name']}: one layer expert-parallel ({par['world_size']} ranks, {par['backend']}, "
                     f"{par['nodes']} node(s), {dtype}, routing {mode}; T tokens per rank per forward; median of "
                     f"{reps} window(s))")
            cols = layer_job_columns(a["experts"])
        else:
            title = (f"moe-energy {a['name']}: one layer, {env['device_name']}, {dtype}, routing {mode}; median "
                     f"[min-max] of {reps} window(s)")
            cols = layer_columns(a["experts"])
        lead, at = 2, 2
    elif par:
        title = (f"moe-energy expert-parallel results ({par['world_size']} ranks, {par['backend']}, {par['nodes']} "
                 f"node(s), {dtype}; median of {reps} window(s) per model)")
        cols, lead, at = SEED_JOB, 2, 3
    else:
        title = f"moe-energy results ({env['device_name']}, {dtype}; median [min-max] of {reps} window(s) per model)"
        cols, lead, at = SEED, 3, 5
    return title, cols + [Column(h, lambda m, c=cell: escape(c(m))) for h, cell in power_columns(doc)], lead, at


def results_table(doc: dict) -> Table:
    """One row per record: a measured one's figures, a skipped or failed one's reason after its leading cells."""
    title, cols, lead, at = columns(doc)
    t = Table(title=escape(title))
    for c in cols:  # fold, never '…': a truncated range would hide the very figure the table is for
        t.add_column(escape(c.header), justify="left" if c.header in LEFT else "right", overflow="fold")
    for m in doc["models"]:
        if not m.get("skipped"):
            t.add_row(*[c.cell(m) for c in cols])
            continue
        why = f"skipped: {m['skipped']}" if doc.get("parallel") else not_measured(m).split(" (")[0]
        t.add_row(*[c.cell(m) for c in cols[:lead]], *["-"] * (at - lead), escape(why), *["-"] * (len(cols) - at - 1))
    return t


def model_table(doc: dict) -> Table:
    """An LLM layer's whole-model figure, labelled as the extrapolation it is."""
    t = Table(title="whole model, EXTRAPOLATED from one layer")
    for col in ("model", "T", "model tokens/s", "model J/1k tokens"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for m in doc["models"]:
        x = m.get("model_extrapolated")
        if x:
            t.add_row(escape(m["name"].split("@")[0]), str(m["tokens_per_forward"]),
                      fmt(x["tokens_per_second"], ",.2f"), fmt(x["joules_per_1k_tokens"], ",.2f"))
    return t


def weights_lines(doc: dict) -> list[str]:
    """--weights int8: how the weights were held, and each model's output error against its dtype's own."""
    errs = {m["name"].split("@")[0]: m["weights_output_error"] for m in doc.get("models") or []
            if m.get("weights_output_error") is not None}
    if not (doc.get("options") or {}).get("weights"):
        return []
    measured = ", ".join(f"{n} {e:.2%}" for n, e in errs.items()) or "not measured"
    w = doc["options"]["weights"]
    return [f"weights: {describe(w)} (the MoE's router in the dtype); output error vs the dtype's own "
            f"weights (||y_q - y|| / ||y|| on up to {ERROR_ROWS} inputs): {measured}"]


def accuracy_lines(dataset: dict) -> list[str]:
    """What held-out accuracy can reach on the synthetic task: its noise makes some labels unpredictable."""
    top, chance = dataset.get("ceiling_accuracy"), dataset.get("chance_accuracy")
    if top is None or chance is None:
        return []
    return [f"held-out accuracy: chance {chance:.1%}, ceiling {top:.1%} (the noise-free labels' agreement: the "
            "task's N(0, 0.2) score noise makes the rest unpredictable; train accuracy above it is memorisation)"]


def busy_roofline_line(doc: dict) -> str | None:
    """The line under a table whose fractions come from a calibration taken while other work shared the CPUs:
    its figures are low, so every fraction is high, and it judges every later run until measured again."""
    roof = doc.get("roofline") or {}
    if not roof.get("busy"):
        return None
    return (f"roofline: calibrated while busy ({roof['busy']}, {roof.get('measured_utc')}): its bounds may be "
            "short and every fraction high; run `moe-energy calibrate --force` when the host is idle")


def energy_summary(doc: dict) -> list[str]:
    """Lines under the table: which meter, the idle power, and how many windows carry warnings."""
    meter = doc.get("energy_meter") or {}
    dt = doc.get("dtype") or {}
    head = [f"dtype: {dt['name']} ({dt['why']})"] if dt.get("why") else []
    head += weights_lines(doc)
    lines = [f"energy: meter {meter.get('name')} ({meter.get('method')}), devices "
             f"{', '.join(meter.get('devices') or []) or 'none'}"]
    if meter.get("method") == "estimate":
        lines[0] += " -- ESTIMATE, not a measurement; do not compare with measured figures"
    idle = doc.get("idle")
    if idle and idle.get("power_w") is not None:
        lines.append(f"idle power: {idle['power_w']:.2f} W ({meter.get('method')}) over {idle['seconds']:.1f} s "
                     "(dynamic = raw minus idle power x window seconds)")
        lines += [f"idle power warning: {f}" for f in faults(idle.get("flags") or [])]
    else:
        lines.append(f"idle power: not measured (dynamic {unit(doc)}/J needs --idle-seconds > 0)")
    windows = [w for m in doc["models"] for w in m.get("windows", [])]
    flagged = [fs for w in windows if (fs := faults(w.get("flags") or []))]
    if flagged:
        lines.append(f"{len(flagged)} of {len(windows)} windows carry warnings (all under 'flags' in the JSON); the "
                     f"first: {flagged[0][0]}")
    failed = [w["failed"] for w in windows if w.get("failed")]
    if failed:
        lines.append(f"{len(failed)} of {len(windows)} windows FAILED and were left out of the figures: {failed[0]}")
    if isinstance(idle, dict) and idle.get("failed"):
        lines[1] = f"idle power: not measured ({idle['failed']})"
    lines += power_lines(doc)
    lines += [line for line in (busy_roofline_line(doc),) if line]  # the JSON's and report's fractions
    lines += accuracy_lines(doc.get("dataset") or {})
    lines += [f"notice: {n}" for n in doc.get("notices", [])]
    for m in doc["models"]:
        if m.get("skipped"):
            lines.append(f"{m['name']}: {not_measured(m).replace('skipped: ', 'skipped, ', 1)}")
        elif m.get("diverged"):
            lines.append(f"{m['name']}: {training_note(m)}; its accuracy is meaningless, its speed and energy are "
                         "valid")
    return head + lines


def _whole_joules(m: dict) -> float | None:
    """A row's J per token for the whole model: its extrapolation's when only N of its layers were built (a
    ratio of two N-layer figures would weigh the LM head and embeddings of each model by its own N)."""
    x = m.get("whole_model_extrapolated")
    return x.get("joules_per_token") if isinstance(x, dict) else m.get("joules_per_token")


def whole_lines(doc: dict) -> list[str]:
    """Under a whole-model table: the MoE's J/token against each dense sibling's at every point, and any figure
    extrapolated from the layers built."""
    rows = [m for m in doc["models"] if m.get("status") == "measured"]
    moe = [m for m in rows if m.get("kind") == "moe"]
    lines = []
    for m in moe:
        for d in (r for r in rows if r.get("kind") == "dense" and
                  (r["phase"], r["batch"], r["context"]) == (m["phase"], m["batch"], m["context"])):
            jm, jd = _whole_joules(m), _whole_joules(d)
            if jm and jd:
                est = " (estimates)" if m.get("energy_is_estimate") or d.get("energy_is_estimate") else ""
                x = ", EXTRAPOLATED" if m.get("whole_model_extrapolated") or d.get("whole_model_extrapolated") else ""
                lines.append(f"{m['phase']} B={m['batch']} L={m['context']}: {m['model']} / {d['model']} J per token "
                             f"= {jm / jd:.3g}{est} (whole models{x}: {m['layers_measured']} of {m['layers_total']} "
                             f"and {d['layers_measured']} of {d['layers_total']} layers measured)")
    lines += sorted({f"{m['model']}: {m['whole_model_extrapolated']['label']}" for m in rows
                     if m.get("whole_model_extrapolated")})
    return lines


def print_results(doc: dict) -> None:
    """The table, an LLM layer's labelled whole-model extrapolation or a whole model's MoE/dense ratios, then the
    lines under them."""
    console.print(results_table(doc))
    if doc.get("family") == "llm_layer" and not doc.get("parallel") and doc["arch"]["moe_layers"] > 1 \
            and any(m.get("model_extrapolated") for m in doc["models"]):
        console.print(model_table(doc))
        console.print(escape(doc.get("extrapolation", "")), highlight=False, soft_wrap=True)
    lines = whole_lines(doc) if doc.get("family") == "whole_model" else []
    for line in lines + energy_summary(doc):
        console.print(escape(line), highlight=False, soft_wrap=True)
