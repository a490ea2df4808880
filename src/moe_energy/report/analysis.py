"""From stored measurements to answers: per (batch size, dtype, strategy), where MoE overtakes dense.

Points are compared along total parameters at one sparsity (E/k: the built-in grids hold it at the seed's
4), so a custom grid that also varies k gets one curve per E/k rather than a zigzag.

The crossover is the smallest total parameter count at which the MoE's figure exceeds that of the dense
model matched to its total: found between neighbouring sweep points by interpolating log(MoE / dense)
linearly in log10(params). That is a straight line between the points on the report's log-log plots, so
the marked crossover sits exactly where the drawn curves cross, and the answer does not depend on which
model is the numerator. The interval comes from the repeats' spread (best case: MoE's max vs dense's min;
worst case: MoE's min vs dense's max).
Energy figures of different kinds are never silently compared: an estimate against a measured figure is
left out and said so, and one curve keeps one method, its most exact (a counter over sampled power over an
estimate), naming the points it left out.

LLM layers (issue 14) get the same crossover along another axis: tokens per forward, from a decoding step to a
prefill chunk, per (arch, routing, dtype, weights format, strategy): the same pairs (MoE, total-matched dense FFN),
the same interpolation in log10(x), the same interval from the repeats; only the axis differs (``Pair.x``). A layer
run with int8 weights (issue 24; w8a8 likewise) is a group of its own: every model of its point holds that format,
so an int8 MoE is only ever compared with int8 dense FFNs, never with the dtype's.

Power caps (issue 15) are one more grouping: a capped point is a point of its own, so every crossover is per
cap (``Crossover.power_limit_w``), and ``cap_series`` / ``best_caps`` compare one model's figures across caps
at an otherwise identical setting (shape, batch, dtype; or arch, routing, dtype, tokens per forward).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..energy.meter import METHODS, faults, weakest
from ..storage.store import JSON_COLUMNS, LAYER_FAMILY, WHOLE_FAMILY, Store, stored_json, stored_key

MEASURED = ("counter", "sampled")
METRICS = {
    "inferences_per_joule": "inferences/J",
    "inferences_per_second": "inferences/s",
    "correct_per_joule": "correct inferences/J",
}
ENERGY_METRICS = ("inferences_per_joule", "correct_per_joule", "joules_per_token")
TDP_KEYS = ("tdp_w", "tdp_watts", "power_limit_w")

Group = tuple[int, str, str, str, float | None]  # (batch_size, dtype, strategy, E/k, cap W): one curve along params
# (arch, routing, dtype, weights format, strategy, cap W): one curve along tokens
LayerGroup = tuple[str, str, str, str, str, float | None]
AXIS_UNITS = {"params": "params", "tokens": "tokens per forward", "batch": "sequences per batch",
              "context": "tokens of context"}
ONE_UNIT = {"tokens": "token per forward", "batch": "sequence per batch", "context": "token of context"}


def finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def value(rec: dict, metric: str, bound: str | None = None) -> float | None:
    """A model's figure; ``bound`` 'min'/'max' reads the repeats' spread (the median when there is none)."""
    if metric == "joules_per_token":  # the inverse of tokens/J: its best case is tokens/J's max
        ipj = value(rec, "inferences_per_joule", {"min": "max", "max": "min"}.get(bound or ""))
        return 1 / ipj if ipj else None
    if metric == "correct_per_joule":  # correct answers per joule: a fast but worse model does not win by default
        if rec.get("diverged"):  # its accuracy is meaningless, so is any figure weighted by it
            return None
        ipj, acc = value(rec, "inferences_per_joule", bound), finite(rec.get("accuracy"))
        return None if ipj is None or acc is None else acc * ipj
    v = finite(rec.get(f"{metric}_{bound}")) if bound else None
    return v if v is not None else finite(rec.get(metric))


def weights_format(m: dict) -> str:
    """How a record's weights were stored: 'int8' or 'w8a8' (--weights), else its dtype: the format that decides
    its bytes read, so records of two formats are never one comparison."""
    return str(m.get("weights") or m.get("dtype"))


def energy_kind(rec: dict) -> str:
    """'measured', 'estimate' or 'none': the only distinction that decides whether two figures compare."""
    m = rec.get("energy_method")
    if rec.get("energy_is_estimate") and m != "none":
        return "estimate"
    if m in MEASURED:
        return "measured"
    return "estimate" if m == "estimate" else "none"


def energy_method(rec: dict) -> str:
    """The record's method, one of METHODS (most exact first): an estimate is 'estimate' however it is stored."""
    kind = energy_kind(rec)
    return str(rec.get("energy_method")) if kind == "measured" else kind


def most_exact(recs: Iterable[dict]) -> list[dict]:
    """The measured or estimated records of the most exact method among them (a counter over sampled power over an
    estimate): a choice among figures is made within one method, never across two."""
    rated = [m for m in recs if energy_kind(m) != "none"]
    best = min((energy_method(m) for m in rated), key=METHODS.index, default=None)
    return [m for m in rated if energy_method(m) == best]


# What a curve that keeps only its most exact method says of the points of each less exact method it left out.
LEFT_OUT = {
    "sampled": "{n} sampled point(s) left out: the others are read from an energy counter, and sampled power "
               "integrated is less exact (a curve through both could cross only where the method changes)",
    "estimate": "{n} estimated point(s) left out: the others are measured, and an estimate is not compared with a "
                "measured figure",
}


# -- the data the report draws ---------------------------------------------------------------------------
@dataclass
class Frame:
    """The latest measurement of each point, flattened: what every plot and table reads."""

    runs: list[dict] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)  # done points, ascending total params
    models: list[dict] = field(default_factory=list)  # one per measured model; with point fields
    layers: list[dict] = field(default_factory=list)  # LLM layers: one per (model, token count); with point fields
    wholes: list[dict] = field(default_factory=list)  # whole models: one per (model, phase, batch, context)
    windows: list[dict] = field(default_factory=list)  # one per window; 'trace': [(device, t_s, power_w)]
    skipped: list[dict] = field(default_factory=list)  # points that were skipped or failed (latest attempt)
    tdp_w: float | None = None
    tdp_source: str | None = None
    damaged: dict[str, int] = field(default_factory=dict)  # table -> rows left out: their stored JSON is damaged

    def methods(self) -> set[str]:
        """Energy methods of the rows measured (a skipped row's 'none' says nothing of the meter)."""
        return {str(m.get("energy_method")) for m in (*self.models, *self.layers, *self.wholes) if m.get("repeats")}

    def damage_note(self) -> str | None:
        """One line on the damaged rows left out, for the report's notes; None when there are none."""
        n = sum(self.damaged.values())
        if not n:
            return None
        by_table = ", ".join(f"{k} {v}" for k, v in sorted(self.damaged.items()))
        return f"{n} stored row(s) with damaged JSON left out ({by_table})"


def load(store: Store) -> Frame:
    """Read the store; when a point was measured more than once, the latest completed measurement wins.

    A row whose stored JSON is damaged (malformed, or not the object it should be) is left out and counted in
    ``Frame.damaged``: one bad row costs its own figures, not the whole report."""
    damaged: Counter[str] = Counter()
    latest: dict[str, dict] = {}
    for p in store.points():  # ascending id: later rows replace earlier ones, a done row is never replaced by a failure
        key = stored_key(p)
        prev = latest.get(key)
        if prev is None or p["status"] == "done" or prev["status"] != "done":
            latest[key] = p
    done = {p["id"]: p for p in latest.values() if p["status"] == "done"}
    f = Frame(runs=_runs(store, damaged))
    f.points = sorted(done.values(), key=lambda p: (p["total_params"] or 0, p["batch_size"] or 0, p["id"]))
    f.skipped = sorted((p for p in latest.values() if p["status"] != "done"), key=lambda p: p["total_params"] or 0)
    every = _models(store, done, damaged)
    f.models = [m for m in every if m.get("family") not in (LAYER_FAMILY, WHOLE_FAMILY)]
    f.layers = [m for m in every if m.get("family") == LAYER_FAMILY]
    f.wholes = [m for m in every if m.get("family") == WHOLE_FAMILY]
    model_ids = {m["model_id"] for m in f.models}
    traces = store.traces(damaged)
    f.windows = [{**w, "trace": traces.get(w["id"], [])} for w in store.window_rows() if w["model_id"] in model_ids]
    documents = []
    for p in f.points:
        doc = stored_json(p["document_json"]) if p.get("document_json") is not None else {}
        if doc is None:
            damaged["points"] += 1
        documents.append(doc)
    for source in (*(r["meter"] for r in f.runs), *documents):
        tdp = find_tdp(source)
        if tdp is not None:
            f.tdp_w, f.tdp_source = tdp
            break
    f.damaged = dict(damaged)
    return f


def _runs(store: Store, damaged: Counter[str]) -> list[dict]:
    """The runs, each with its meter parsed as 'meter'; a damaged environment or meter is blanked (the run's
    other columns still describe it) and counted."""
    runs = []
    for r in store.runs():
        env = stored_json(r.get("environment_json"))
        meter_raw = r.get("meter_json")
        meter = stored_json(meter_raw) if meter_raw is not None else {}
        if env is None or meter is None:
            damaged["runs"] += 1
        runs.append({**r, "environment_json": r.get("environment_json") if env is not None else None,
                     "meter_json": meter_raw if meter is not None else None, "meter": meter or {}})
    return runs


def _models(store: Store, done: dict[int, dict], damaged: Counter[str]) -> list[dict]:
    """Every model of a done point, its record merged with its columns and its point's fields."""
    out = []
    for row in store.model_rows():
        if row["point_id"] not in done:
            continue
        rec = stored_json(row["record_json"])
        m = {**(rec or {}), **{k: v for k, v in row.items() if k not in ("record_json", *JSON_COLUMNS)
                               and v is not None}}
        if rec is None or not _usable(m):
            damaged["models"] += 1
            continue
        m.update(record=rec, point_id=row["point_id"], model_id=row["id"], label=row["point_label"],
                 total_params=row["point_total_params"], ek=sparsity(row["point_experts"], row["point_top_k"]))
        m["batch_size"] = m.get("batch_size") or row["point_batch_size"]
        m["dtype"] = m.get("dtype") or row["point_dtype"]
        m["kind"] = m.get("kind") or ("moe" if str(m.get("name", "")).startswith("moe") else "dense")
        m["family"] = row.get("point_family")
        if m["family"] == WHOLE_FAMILY:  # the set it was measured in: its MoE (the first model) and how that ran
            m["set"], m["impl"] = done[row["point_id"]].get("model"), done[row["point_id"]].get("moe_impl")
        out.append(m)
    return out


def _usable(m: dict) -> bool:
    """The fields every table and plot reads without a default: a name, and whole parameter counts."""
    counts = (m.get("params"), m.get("active_params"))
    return isinstance(m.get("name"), str) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts)


def sparsity(experts: int | None, top_k: int | None) -> str:
    """E/k as text ('4', '2.67'): the label of one curve along total params."""
    return f"{round(experts / top_k, 2):g}" if experts and top_k else "?"


def find_tdp(obj: Any) -> tuple[float, str] | None:
    """A power limit / TDP figure anywhere in a meter's or document's metadata (W), with its key."""
    if isinstance(obj, dict):
        for k in TDP_KEYS:
            v = finite(obj.get(k))
            if v is not None and v > 0:
                return v, k
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return next((found for v in children if (found := find_tdp(v)) is not None), None)


# -- crossover -------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """The MoE and its total-matched dense model at one sweep point."""

    params: int  # the MoE's total parameter count (the dense one has at most one layer's width more)
    moe: dict
    dense: dict
    label: str = ""
    x: float | None = None  # where the pair sits on a crossover's axis other than params (tokens per forward)

    @property
    def at(self) -> float:
        return float(self.params if self.x is None else self.x)


def pairs(frame: Frame) -> dict[Group, list[Pair]]:
    """Per (batch size, dtype, strategy): (MoE, dense-total) pairs of each point, ascending params."""
    dense_by_point = {m["point_id"]: m for m in frame.models if m["kind"] == "dense" and m.get("match") == "total"}
    out: dict[Group, list[Pair]] = {}
    for m in frame.models:
        if m["kind"] != "moe" or m["point_id"] not in dense_by_point:
            continue
        g = (m["batch_size"], m["dtype"], m["strategy"], m["ek"], cap_of(m))
        out.setdefault(g, []).append(Pair(int(m["params"]), m, dense_by_point[m["point_id"]], m.get("label") or ""))
    for g in out:
        out[g].sort(key=lambda p: p.params)
    return out


def crossing(xs: list[float], d: list[float]) -> tuple[str, float | None]:
    """First place where ``d`` (log of MoE / dense) turns positive along ascending ``xs``.

    Returns ('crossed', x*) with x* interpolated linearly in log10(x) between the two neighbouring points,
    ('below_grid', xs[0]) when MoE already leads at the smallest point, ('not_reached', None) otherwise.
    """
    if len(xs) != len(d) or not xs:
        raise ValueError("xs and d must be non-empty and of equal length")
    if d[0] > 0:
        return "below_grid", xs[0]
    for i in range(len(xs) - 1):
        if d[i] <= 0 < d[i + 1]:
            l0, l1 = math.log10(xs[i]), math.log10(xs[i + 1])
            t = -d[i] / (d[i + 1] - d[i])
            return "crossed", 10 ** (l0 + t * (l1 - l0))
    return "not_reached", None


@dataclass
class Crossover:
    """Where MoE overtakes dense along ``axis``: total params (the seed's sizes), or tokens per forward (an LLM
    layer: ``params``, ``low``, ``high``, ``min_params``, ``max_params`` are then token counts)."""

    batch_size: int | None
    dtype: str | None
    strategy: str | None
    ek: str | None
    metric: str
    status: str  # crossed | below_grid | not_reached | not_measured
    params: float | None = None
    low: float | None = None  # best case (spread): MoE max vs dense min
    high: float | None = None  # worst case: MoE min vs dense max; None = beyond the largest point
    low_status: str | None = None  # 'below_grid': the best case leads already at the smallest point
    high_status: str | None = None
    n_points: int = 0
    min_params: float | None = None
    max_params: float | None = None
    energy: str | None = None  # 'measured' | 'estimate' for energy metrics
    notes: list[str] = field(default_factory=list)
    axis: str = "params"  # "params" | "tokens"
    arch: str | None = None  # an LLM layer's crossover: its arch, routing and weights format (weights_format)
    routing: str | None = None
    weights: str | None = None
    power_limit_w: float | None = None  # the cap its points ran under (None: the limit in force, untouched)
    model: str | None = None  # a whole model's crossover: its set (the MoE), the dense sibling, the phase and
    vs: str | None = None  # the other axis's value it holds ("context 512" along batch)
    phase: str | None = None
    fixed: str | None = None
    why: str | None = None  # why a 'not_measured' one has no figure when its figures were measured

    @property
    def unit(self) -> str:
        return METRICS[self.metric]

    def answer(self) -> str:
        """The crossover in words, with its interval and range."""
        u, n = AXIS_UNITS[self.axis], _number
        if self.status == "not_measured":
            return self.why or "not measured"
        if self.status == "below_grid":
            u = ONE_UNIT.get(self.axis, u) if self.min_params == 1 else u  # "1 token per forward"
            return f"at or below {n(self.min_params)} {u} (MoE already ahead at the smallest point)"
        if self.status == "not_reached":
            return f"not reached up to {n(self.max_params)} {u}"
        assert self.params is not None
        lo = n(self.low) if self.low is not None else "?"
        if self.low_status == "below_grid":
            lo = f"at or below {lo}"
        hi = n(self.high) if self.high is not None else f"beyond {n(self.max_params)}"
        return f"~{n(self.params)} {u} (interval {lo} to {hi})"


def _number(v: float | None) -> str:
    """1,234,567 for counts; 2.5 below 10, where a token count between two measured ones needs its decimal."""
    if v is None:
        return "?"
    return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def _pair_method(p: Pair) -> str:
    """A pair's energy method: its less exact model's (a ratio is only as exact as its weaker figure)."""
    return weakest([energy_method(p.moe), energy_method(p.dense)])


def _comparable(ps: list[Pair], metric: str) -> tuple[list[Pair], set[str], list[str], int]:
    """(the pairs a crossover of ``metric`` can use, their energy kinds, notes on those left out, how many were
    left out because a model's training failed)."""
    notes: list[str] = []
    usable: list[Pair] = []
    kinds: set[str] = set()
    mixed = unmeasured = untrained = 0
    for p in ps:
        if metric in ENERGY_METRICS:
            km, kd = energy_kind(p.moe), energy_kind(p.dense)
            if "none" in (km, kd):
                unmeasured += 1
                continue
            if km != kd:
                mixed += 1
                continue
            kinds.add(km)
        vm, vd = value(p.moe, metric), value(p.dense, metric)
        if metric == "correct_per_joule" and (p.moe.get("diverged") or p.dense.get("diverged")):
            untrained += 1  # measured, but weighted by an accuracy that means nothing
            continue
        if vm is None or vd is None or vm <= 0 or vd <= 0:  # a ratio needs two positive figures
            unmeasured += 1
            continue
        usable.append(p)
    methods = Counter(_pair_method(p) for p in usable) if metric in ENERGY_METRICS else Counter()
    if len(methods) > 1:
        # each pair alike, but one curve through two methods would set the less exact figure against the more exact
        # one where the method changes (a merged store: shards run on different meters): the most exact wins
        best = min(methods, key=METHODS.index)
        usable = [p for p in usable if _pair_method(p) == best]
        kinds = {energy_kind(p.moe) for p in usable}
        notes += [LEFT_OUT[m].format(n=n) for m, n in sorted(methods.items(), key=lambda mn: METHODS.index(mn[0]))
                  if m != best]
    if mixed:
        notes.append(f"{mixed} point(s) left out: an estimated energy figure is not compared with a measured one")
    if unmeasured and usable:
        notes.append(f"{unmeasured} point(s) without this figure left out")
    if untrained:
        notes.append(f"{untrained} point(s) left out: the MoE's or the dense model's training failed (diverged, did "
                     "not learn, or --epochs 0 left it untrained), so its accuracy, and correct inferences/J, mean "
                     "nothing")
    return usable, kinds, notes, untrained


def crossover(ps: list[Pair], metric: str, group: Group = (None, None, None, None, None),  # type: ignore[assignment]
              axis: str = "params") -> Crossover:
    """The crossover of ``metric`` along one group's pairs (``axis``: where each pair sits, ``Pair.at``); see
    the module docstring for the method."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    b, dt, s, ek, cap = group
    usable, kinds, notes, untrained = _comparable(ps, metric)
    c = Crossover(b, dt, s, ek, metric, "not_measured", n_points=len(usable), axis=axis, power_limit_w=cap)
    if metric in ENERGY_METRICS and kinds:
        c.energy = "estimate" if kinds == {"estimate"} else "measured"
        if c.energy == "estimate":
            notes.append("energy is an estimate (not measured): read the crossover as a rough guide")
    c.notes = notes
    if untrained and not usable:
        c.why = "not comparable: training failed at every point"
    if not usable:
        return c
    xs, d, best, worst = _curves(usable, metric)
    if len(xs) < len(usable):
        c.notes.append(f"{len(usable) - len(xs)} point(s) share their {AXIS_UNITS[axis]} with another: their "
                       "differences averaged")
    c.min_params, c.max_params = xs[0], xs[-1]
    c.status, c.params = crossing(xs, d)
    c.low_status, c.low = crossing(xs, best)
    c.high_status, c.high = crossing(xs, worst)
    if c.low is not None and c.params is not None:
        c.low = min(c.low, c.params)
    if c.high is not None and c.params is not None:
        c.high = max(c.high, c.params)
    if c.status == "not_reached" and c.low is not None:  # the best case already ahead at the smallest point: no "~"
        where = f"at or below {_number(c.low)}" if c.low_status == "below_grid" else f"from ~{_number(c.low)}"
        unit = ONE_UNIT.get(axis, AXIS_UNITS[axis]) if c.low == 1 else AXIS_UNITS[axis]
        c.notes.append(f"within the repeats' spread MoE could lead {where} {unit}")
    if c.status in ("crossed", "below_grid"):
        c.notes += _later_turns(xs, d, c.params or 0, AXIS_UNITS[axis], c.status == "crossed")
    return c


def _later_turns(xs: list[float], d: list[float], lead_from: float, unit: str, crossed: bool) -> list[str]:
    """Notes for a lead that does not hold: where MoE falls behind after it first leads (a measured point) and
    where it leads again (interpolated as the crossover is): an LLM layer's decode / mid / prefill shape."""
    back = next((i for i in range(len(xs)) if xs[i] > lead_from and d[i] <= 0), None)
    if back is None:
        return []
    notes = [f"MoE falls behind {'again ' if crossed else ''}at {_number(xs[back])} {unit}"]
    status, again = crossing(xs[back:], d[back:])
    if status == "crossed":
        notes.append(f"MoE leads again from ~{_number(again)} {unit}")
    return notes


def _curves(ps: list[Pair], metric: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Ascending params and log(MoE / dense): median, best case, worst case (equal sizes averaged)."""
    acc: dict[float, list[tuple[float, float, float]]] = {}
    for p in ps:
        vm, vd = value(p.moe, metric), value(p.dense, metric)
        assert vm is not None and vd is not None
        best = math.log(_pos(value(p.moe, metric, "max"), vm) / _pos(value(p.dense, metric, "min"), vd))
        worst = math.log(_pos(value(p.moe, metric, "min"), vm) / _pos(value(p.dense, metric, "max"), vd))
        acc.setdefault(p.at, []).append((math.log(vm / vd), best, worst))
    xs = sorted(acc)
    mean = [tuple(sum(col) / len(col) for col in zip(*acc[x])) for x in xs]
    return xs, [m[0] for m in mean], [m[1] for m in mean], [m[2] for m in mean]


def _pos(v: float | None, fallback: float) -> float:
    return v if v is not None and v > 0 else fallback


def crossovers(frame: Frame, metrics: Iterable[str] = tuple(METRICS)) -> list[Crossover]:
    """Every group's crossover of each metric; rows left out as damaged are said in each one's notes."""
    out = []
    note = frame.damage_note()
    for g, ps in sorted(pairs(frame).items(), key=group_order):
        for metric in metrics:
            c = crossover(ps, metric, g)
            if note:
                c.notes.append(note)
            out.append(c)
    return out


def layer_pairs(frame: Frame) -> dict[LayerGroup, list[Pair]]:
    """Per (arch, routing, dtype, weights format, strategy): (MoE, dense-total) pairs at each token count, ascending
    tokens (a point's models share one weights format)."""
    dense = {(m["point_id"], m.get("tokens_per_forward")): m for m in frame.layers
             if m["kind"] == "dense" and m.get("match") == "total"}
    out: dict[LayerGroup, list[Pair]] = {}
    for m in frame.layers:
        t = m.get("tokens_per_forward")
        if m["kind"] != "moe" or not isinstance(t, int) or (m["point_id"], t) not in dense:
            continue
        g = (str(m.get("arch")), str(m.get("routing")), str(m["dtype"]), weights_format(m), str(m["strategy"]),
             cap_of(m))
        out.setdefault(g, []).append(Pair(int(m["params"]), m, dense[m["point_id"], t], str(m.get("arch")), float(t)))
    for g in out:
        out[g].sort(key=lambda p: p.at)
    return out


def layer_crossovers(frame: Frame, metrics: Iterable[str] = ("inferences_per_joule", "inferences_per_second")
                     ) -> list[Crossover]:
    """Each LLM layer's crossover over tokens per forward (tokens are its inferences: tokens/J, tokens/s)."""
    out = []
    note = frame.damage_note()
    for (arch, routing, dtype, weights, strategy, cap), ps in sorted(layer_pairs(frame).items(),
                                                                     key=lambda kv: (*kv[0][:5], kv[0][5] or 0.0)):
        for metric in metrics:
            c = crossover(ps, metric, (None, dtype, strategy, None, cap), axis="tokens")  # type: ignore[arg-type]
            c.arch, c.routing, c.weights = arch, routing, weights
            if note:
                c.notes.append(note)
            out.append(c)
    return out


# -- other derived figures -------------------------------------------------------------------------------
def ratios(frame: Frame, metric: str = "inferences_per_joule") -> list[dict]:
    """MoE / dense-total for every pair with comparable figures: {label, params, batch_size, dtype,
    strategy, ratio, energy}."""
    out = []
    for (b, dt, s, ek, cap), ps in pairs(frame).items():
        for p in ps:
            if metric in ENERGY_METRICS and (energy_kind(p.moe) != energy_kind(p.dense)
                                             or energy_kind(p.moe) == "none"):
                continue
            vm, vd = value(p.moe, metric), value(p.dense, metric)
            if vm is None or vd is None or vd <= 0:
                continue
            out.append({"label": p.label, "params": p.params, "batch_size": b, "dtype": dt, "strategy": s, "ek": ek,
                        "power_limit_w": cap, "ratio": vm / vd,
                        "energy": energy_kind(p.moe) if metric in ENERGY_METRICS else None})
    return sorted(out, key=lambda r: (r["params"], r["batch_size"] or 0))


def pareto_front(xy: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (both lower-is-better), by ascending x."""
    order = sorted(range(len(xy)), key=lambda i: (xy[i][0], xy[i][1]))
    front: list[int] = []
    best_y = math.inf
    for i in order:
        if xy[i][1] < best_y:
            front.append(i)
            best_y = xy[i][1]
    return front


# -- power caps (issue 15) -------------------------------------------------------------------------------
def cap_of(m: dict) -> float | None:
    """The cap a record was measured under: the GPU cap asked, else the CPU packages' (None: not capped)."""
    gpu = finite(m.get("power_limit_requested_w"))
    return gpu if gpu is not None else finite(m.get("cpu_power_limit_requested_w"))


def group_order(kv: tuple[Group, Any]) -> tuple:
    """Crossover groups in reading order: batch size, then the text fields, then the cap (uncapped first)."""
    g = kv[0]
    return (g[0] or 0, *map(str, g[1:4]), g[4] or 0.0)


def caps(frame: Frame) -> list[float | None]:
    """Every cap the store's records ran under, ascending (None first: records measured uncapped)."""
    found = {cap_of(m) for m in (*frame.models, *frame.layers, *frame.wholes)}
    return sorted(found, key=lambda c: -1.0 if c is None else c)


def reference_cap(frame: Frame) -> float | None:
    """The cap the size and token plots are drawn at when there are several: uncapped if measured, else the
    highest (the closest to the default limit)."""
    cs = caps(frame)
    return None if None in cs or not cs else cs[-1]


def at_cap(frame: Frame, cap: float | None) -> Frame:
    """The frame's records measured under ``cap`` only (and their points and windows)."""
    models = [m for m in frame.models if cap_of(m) == cap]
    layers = [m for m in frame.layers if cap_of(m) == cap]
    wholes = [m for m in frame.wholes if cap_of(m) == cap]
    ids = {m["point_id"] for m in (*models, *layers, *wholes)}
    model_ids = {m["model_id"] for m in models}
    return replace(frame, points=[p for p in frame.points if p["id"] in ids], models=models, layers=layers,
                   wholes=wholes, windows=[w for w in frame.windows if w["model_id"] in model_ids])


def setting(m: dict) -> str:
    """Everything but the cap that decides a record's figures, as a title: the same setting at two caps is
    one comparison."""
    if m.get("family") == LAYER_FAMILY:
        int8 = f", {m['weights']} weights" if m.get("weights") else ""
        return f"{m.get('arch')}, routing {m.get('routing')}, {m.get('dtype')}{int8}, T={m.get('tokens_per_forward')}"
    return f"{m.get('label')}, batch {m.get('batch_size')}, {m.get('dtype')}"


def model_name(m: dict) -> str:
    """The model's name without its token count or cap suffix: one series across caps."""
    return str(m.get("name", "")).split("@")[0]


def cap_series(frame: Frame) -> dict[str, dict[str, list[dict]]]:
    """{setting: {model: its records ascending by cap}} for capped records with a figure to compare; only
    settings measured at more than one cap."""
    out: dict[str, dict[str, list[dict]]] = {}
    for m in (*frame.models, *frame.layers):
        if cap_of(m) is not None and m.get("status", "measured") == "measured":
            out.setdefault(setting(m), {}).setdefault(model_name(m), []).append(m)
    for models in out.values():
        for recs in models.values():
            recs.sort(key=lambda m: cap_of(m) or 0.0)
    return {k: v for k, v in out.items() if len({cap_of(m) for recs in v.values() for m in recs}) > 1}


@dataclass
class BestCap:
    """The cap at which one model spends the least energy per inference at one setting."""

    setting: str
    model: str
    cap: float
    record: dict  # the record at that cap
    highest: dict  # the record at the highest cap measured, the nearest to the default limit
    n_caps: int
    energy: str  # 'measured' | 'estimate'


def best_caps(frame: Frame) -> list[BestCap]:
    """Per setting and model, the cap that maximises inferences/J (tokens/J), chosen among the records of the most
    exact energy method (``most_exact``: a counter's over sampled power's over an estimate's, never across two)."""
    out = []
    for s, models in sorted(cap_series(frame).items()):
        for name, recs in sorted(models.items(), key=lambda kv: (not kv[0].startswith("moe"), kv[0])):
            rated = most_exact(m for m in recs if (value(m, "inferences_per_joule") or 0) > 0)
            if len(rated) < 2:
                continue
            best = max(rated, key=lambda m: value(m, "inferences_per_joule") or 0.0)
            out.append(BestCap(s, name, cap_of(best) or 0.0, best, rated[-1], len(rated), energy_kind(best)))
    return out


# -- whole models (issue 23): an MoE LLM against its dense siblings, per phase, batch and context ---------------
PHASES = ("prefill", "decode")  # runner.model.PHASES, in the order the report reads them
ITL_DEADLINES_MS = (100.0, 250.0)  # ML.ENERGY's inter-token deadlines: the report's --itl-deadline-ms default


def whole_sets(frame: Frame) -> dict[str, list[dict]]:
    """{the set's MoE: the records of every point of that set} (its dense siblings' included), sets in name order."""
    out: dict[str, list[dict]] = {}
    for m in frame.wholes:
        out.setdefault(str(m.get("set")), []).append(m)
    return dict(sorted(out.items()))


SCALED_DOWN = ("inferences_per_joule", "inferences_per_joule_min", "inferences_per_joule_max", "inferences_per_second")
SCALED_UP = ("ttft_ms", "itl_p50_ms", "itl_p90_ms")


def as_whole(m: dict) -> dict:
    """The record's figures for the whole model: as measured when every layer was built; else scaled as its
    extrapolation scales them (time and energy per token x its scale: a token's matrix work in all layers / in
    the N built), with ``extrapolated`` set to its label, so a model built on 8 of 64 layers is never compared
    with one built whole."""
    x = m.get("whole_model_extrapolated")
    tps, tps_x = finite(m.get("inferences_per_second")), finite(x.get("tokens_per_second")) if isinstance(x, dict) \
        else None
    if not tps or not tps_x:
        return m
    scale = tps / tps_x
    out = {**m, "extrapolated": str(x.get("label"))}  # type: ignore[union-attr]
    out.update({k: v / scale for k in SCALED_DOWN if (v := finite(m.get(k))) is not None})
    out.update({k: v * scale for k in SCALED_UP if (v := finite(m.get(k))) is not None})
    return out


def unstable(m: dict) -> str | None:
    """Why a record is kept out of the answers, or None: not measured, a failed window, or any flag on a window
    or the record (ML.ENERGY's stability rule keeps out windows whose decode batch shrank or whose steady state
    was shorter than the window; here a decode step holds its batch and its KV cache at L by construction, so a
    window is unstable when the meter or the clock flagged it: too short, a zero or impossible reading, a trace
    far from its counter). The estimate's label is not a fault: estimates are labelled and compared only with
    estimates."""
    if m.get("status") != "measured" or not m.get("repeats"):
        return str(m.get("skipped") or "not measured")
    windows = [w for w in m.get("windows") or [] if isinstance(w, dict)]
    failed = next((w["failed"] for w in windows if w.get("failed")), None)
    if failed:
        return f"window failed: {failed}"
    flags = faults([*(m.get("flags") or []), *(f for w in windows for f in w.get("flags") or [])])
    return flags[0] if flags else None


def stable(records: Iterable[dict]) -> tuple[list[dict], int]:
    """(the records an answer may use: stable, with a J/token figure; how many measured ones were kept out as
    flagged)."""
    ok, flagged = [], 0
    for m in records:
        if unstable(m) is not None:
            flagged += m.get("status") == "measured"
        elif energy_kind(m) != "none" and value(m, "joules_per_token"):
            ok.append(m)
    return ok, flagged


def whole_crossovers(frame: Frame, axis: str = "batch") -> list[Crossover]:
    """Where each MoE passes each dense sibling in tokens/J, along batch (per phase, context, dtype, impl, cap) or
    along context (per phase, batch, dtype, impl, cap), from stable records only, found as the size crossover is; on
    whole-model figures (``as_whole``: extrapolated where fewer layers were built, said in the notes)."""
    other = "context" if axis == "batch" else "batch"
    out = []
    for name, recs in whole_sets(frame).items():
        ok, _ = stable(as_whole(m) for m in recs)
        groups: dict[tuple, dict[str, list[dict]]] = {}
        for m in ok:
            g = (str(m.get("phase")), m.get(other), str(m.get("dtype")), str(m.get("impl")), cap_of(m))
            groups.setdefault(g, {}).setdefault(str(m.get("model")), []).append(m)
        for (phase, at, dtype, impl, cap), by_model in sorted(groups.items(), key=lambda kv: (
                PHASES.index(kv[0][0]), *kv[0][1:4], kv[0][4] or 0.0)):
            # each sibling's record against the MoE's of its own point: one run, meter and repeats (a store may
            # hold the set twice at one batch, measured and estimated)
            moe = {(m.get("point_id"), m[axis]): m for m in by_model.get(name, [])}
            for sib in sorted(n for n in by_model if n != name):
                ps = [Pair(int(moe[k]["params"]), moe[k], d, name, float(d[axis]))
                      for d in by_model[sib] if (k := (d.get("point_id"), d[axis])) in moe]
                c = crossover(sorted(ps, key=lambda p: p.at), "inferences_per_joule",
                              (None, dtype, impl, None, cap), axis=axis)  # type: ignore[arg-type]
                c.model, c.vs, c.phase, c.fixed = name, sib, phase, f"{other} {at}"
                c.notes += sorted({f"{m['model']}: {m['extrapolated']}" for p in ps for m in (p.moe, p.dense)
                                   if m.get("extrapolated")})
                out.append(c)
    return out


@dataclass
class Choice:
    """ML.ENERGY's selection: one model's lowest-J/token configuration at one phase and context meeting a deadline
    (decode: its ITL p90; prefill: none, a prompt has no inter-token latency)."""

    set: str
    model: str
    phase: str
    context: int
    deadline_ms: float | None
    record: dict | None  # None: no stable configuration meets the deadline
    meeting: int  # stable configurations meeting it
    candidates: int  # stable configurations measured
    flagged: int  # configurations kept out: a window flagged or failed
    energy: str  # 'measured' | 'estimate' | '-' (no stable configuration)


def _pick(rows: list[dict], deadline: float | None) -> list[dict]:
    """The rows meeting ``deadline`` (ITL p90 at or under it), or all of them without one."""
    if deadline is None:
        return rows
    return [m for m in rows if (t := finite(m.get("itl_p90_ms"))) is not None and t <= deadline]


def selections(frame: Frame, deadlines: Iterable[float] = ITL_DEADLINES_MS) -> list[Choice]:
    """For every model of every set, phase and context: the lowest J/token configuration (batch, dtype, impl)
    among the stable ones whose decode ITL p90 meets each deadline, on whole-model figures (``as_whole``), among the
    records of the most exact energy method (``most_exact``: never a counter's figure against sampled power's or an
    estimate)."""
    out = []
    for name, recs in whole_sets(frame).items():
        cells: dict[tuple, list[dict]] = {}
        for m in recs:
            cells.setdefault((str(m.get("model")), str(m.get("phase")), m.get("context")), []).append(m)
        for (model, phase, context), rows in sorted(cells.items(), key=lambda kv: (
                kv[0][0] != name, kv[0][0], PHASES.index(kv[0][1]), kv[0][2] or 0)):
            ok, flagged = stable(as_whole(m) for m in rows)
            ok = most_exact(ok)
            kind = energy_kind(ok[0]) if ok else "-"
            for deadline in (list(deadlines) if phase == "decode" else [None]):
                meet = _pick(ok, deadline)
                best = min(meet, key=lambda m: value(m, "joules_per_token") or math.inf) if meet else None
                out.append(Choice(name, model, phase, int(context or 0), deadline, best, len(meet), len(ok),
                                  flagged, kind))
    return out


def time_energy(records: Iterable[dict], phase: str) -> tuple[list[tuple[dict, float, float]], list[int]]:
    """[(record, latency ms, J/token)] of the stable records of one phase (decode: ITL p90; prefill: TTFT), on
    whole-model figures (``as_whole``), and the indices of their Pareto front: no other configuration both faster and
    cheaper per token."""
    key = "itl_p90_ms" if phase == "decode" else "ttft_ms"
    pts = [(m, t, j) for m in stable(as_whole(r) for r in records if r.get("phase") == phase)[0]
           if (t := finite(m.get(key))) is not None and (j := value(m, "joules_per_token")) is not None]
    return pts, pareto_front([(t, j) for _, t, j in pts])
