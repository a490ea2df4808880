"""The window record and the model record: declared once here, built here, read by the store, the report,
the API and the CLI. Every figure carries its unit in its name; a figure nobody measured is ``None`` with a
``*_reason``, never 0 and never inf. These are the JSON format of ``results/run-*.json`` and of the store's
documents: a field that changes bumps ``results.SCHEMA_VERSION``.

A model record's flat figures are MEDIANS over its windows (``MEDIAN_KEYS``); ``SPREAD_KEYS`` also get
``_min``/``_max``. ``energy_method`` is the weakest method among the devices ("counter" | "sampled" |
"estimate" | "none"); ``energy_is_estimate`` is True when any joule figure comes from the estimate model.
The run document also carries ``energy_meter`` (name, method, devices, versions, notice) and ``idle``
({seconds, power_by_device_w, power_w, method, flags} or None when skipped).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from ..energy.idle import dynamic_joules
from ..energy.meter import weakest
from .window import BenchResult, per_joule, percentile

if TYPE_CHECKING:
    from ..energy.idle import IdlePower
    from ..train import TrainResult

# Flat per-window figures whose median becomes the model's figure, and those whose min/max are kept too.
MEDIAN_KEYS = (
    "inferences_per_second", "inferences_per_joule", "energy_j", "average_power_w", "dynamic_energy_j",
    "dynamic_average_power_w", "dynamic_inferences_per_joule", "latency_p50_ms", "latency_p90_ms", "latency_p95_ms",
    "latency_mean_ms", "achieved_gflops", "window_s", "batches", "inferences",
)
SPREAD_KEYS = ("inferences_per_second", "inferences_per_joule", "dynamic_inferences_per_joule", "energy_j",
               "average_power_w")


# A per-joule figure's energy, and what a window whose energy came out at or below zero had: it WAS measured,
# but gives no figure to divide by (``per_joule``), so the summary must not call it "not measured".
AT_OR_BELOW_ZERO = {
    "inferences_per_joule": ("energy_j", "energy <= 0 (the counter did not advance)"),
    "dynamic_inferences_per_joule": ("dynamic_energy_j", "dynamic energy <= 0 (idle reading at or above the window's "
                                                         "draw)"),
}


class WindowRecord(TypedDict, total=False):
    """One window, in the order the run measured it. ``failed`` (a reason) marks a window with no energy."""

    repeat: int
    order: int  # global position in the shuffled schedule
    started_utc: str
    failed: str
    batch_size: int
    batches: int
    inferences: int
    window_s: float
    inferences_per_second: float
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p95_ms: float | None
    latency_mean_ms: float | None
    flops_per_inference: int | None
    achieved_gflops: float | None
    energy_j: float | None
    energy_by_device_j: dict[str, float] | None
    average_power_w: float | None
    inferences_per_joule: float | None
    inferences_per_joule_reason: str | None
    dynamic_energy_j: float | None
    dynamic_energy_by_device_j: dict[str, float] | None
    dynamic_average_power_w: float | None
    dynamic_inferences_per_joule: float | None
    dynamic_inferences_per_joule_reason: str | None
    energy_method: str
    method_by_device: dict[str, str]
    energy_meter: str
    energy_devices: list[str]
    energy_is_estimate: bool
    trace: dict[str, list[list[float]]] | None  # device -> [[t_s, power_w], ...]
    trace_energy_j: dict[str, float] | None
    trace_period_s: float | None
    state_begin: dict[str, dict[str, Any]]  # device -> {temperature_c, sm_clock_mhz, power_limit_w}
    state_end: dict[str, dict[str, Any]]
    power_limit_w: float | None  # the GPU power limit in force, read back after the window (None: none read)
    cpu_power_limit_w: float | None  # the CPU packages' long-term RAPL limit, read back where --cpu-power-limit set it
    flags: list[str]


class ModelRecord(TypedDict, total=False):
    """One model (an MoE strategy or a dense baseline) of a run: its shape, training and window figures."""

    name: str  # "moe[grouped]", "dense_total", ...
    kind: str  # "moe" | "dense"
    match: str  # dense only: "total" | "active"
    params: int
    active_params: int
    flops_per_inference: int | None
    width: int
    strategy: str | None
    dtype: str
    status: str  # "measured" | "skipped" | "failed"
    skipped: str
    accuracy: float | None
    accuracy_bench_dtype: float | None
    accuracy_meaningful: bool
    diverged: bool | None
    train: dict[str, Any] | None
    idle_power_w: float | None
    idle_power_by_device_w: dict[str, float] | None
    repeats: int  # windows measured
    failed_windows: int
    batch_size: int
    # medians over the windows (MEDIAN_KEYS) and their spread (SPREAD_KEYS' _min/_max)
    inferences_per_second: float | None
    inferences_per_second_min: float | None
    inferences_per_second_max: float | None
    inferences_per_joule: float | None
    inferences_per_joule_min: float | None
    inferences_per_joule_max: float | None
    inferences_per_joule_reason: str | None
    dynamic_inferences_per_joule: float | None
    dynamic_inferences_per_joule_min: float | None
    dynamic_inferences_per_joule_max: float | None
    dynamic_inferences_per_joule_reason: str | None
    energy_j: float | None
    energy_j_min: float | None
    energy_j_max: float | None
    average_power_w: float | None
    average_power_w_min: float | None
    average_power_w_max: float | None
    dynamic_energy_j: float | None
    dynamic_average_power_w: float | None
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p95_ms: float | None
    latency_mean_ms: float | None
    achieved_gflops: float | None
    window_s: float | None
    batches: float | None
    inferences: float | None
    energy_method: str
    energy_meter: str
    energy_devices: list[str]
    energy_is_estimate: bool
    # the roofline (None until `moe-energy calibrate` ran for this device and dtype)
    flops_per_batch: float
    weight_bytes_per_batch: float
    experts_touched: float | None  # MoE: distinct experts one forward reached (weight_bytes_per_batch reads them)
    roofline_bound_ms: float | None
    memory_bound_ms: float | None
    compute_bound_ms: float | None
    bound: str | None  # "memory" | "compute": the slower of the two, the one that applies
    fraction_of_roofline: float | None
    optimize: dict[str, Any] | None
    parallel: dict[str, Any]
    # power caps and carbon/cost (issue 15): the cap read back, and figures built on the user's assumptions
    power_limit_w: float | None  # median of the windows' read-back limits (the limit in force, capped or not)
    power_limit_requested_w: float | None  # --power-limit's cap this row was measured at (None: not capped)
    cpu_power_limit_w: float | None
    carbon_intensity_g_per_kwh: float | None
    price_per_kwh: float | None
    co2e_g_per_million: float | None  # per million inferences (tokens for LLM layers)
    cost_per_million: float | None
    carbon_basis: str | None  # "estimate from measured energy" | "estimate of an estimate"
    flags: list[str]
    windows: list[WindowRecord]


class LayerRecord(ModelRecord, total=False):
    """A model record of the LLM-layer workload: inferences are tokens, plus the routing it measured."""

    tokens_per_forward: int
    arch: str
    routing: str
    tokens_per_second: float | None
    tokens_per_joule: float | None
    joules_per_1k_tokens: float | None
    experts_touched_if_uniform: float | None
    expert_load_max_over_mean: float | None
    weight_bytes_read_per_forward: float | None
    weights: str | None  # "int8" (--weights): how the weights were stored; None, in the dtype
    weights_output_error: float | None  # int8: ||y_int8 - y|| / ||y|| on the first inputs, against the dtype's own
    # the roofline split (roofline.figures): the bytes above at the copy bandwidth, the FLOPs at the GEMM rate
    model_extrapolated: dict[str, Any] | None


class WholeRecord(ModelRecord, total=False):
    """A model record of the whole-model workload (issue 23): one model at one (phase, batch, context); tokens are
    the inferences (prompt tokens for a prefill, new tokens for a decode step)."""

    model: str
    phase: str  # "prefill" | "decode"
    batch: int  # sequences per step
    context: int  # prompt tokens; a decode step's KV cache length
    tokens_per_call: int  # B x L for a prefill, B for a decode step
    layers_measured: int  # N of the model's layers built (the first N)
    layers_total: int
    moe_impl: str | None  # how the MoE blocks ran (None: a dense model)
    tokens_per_second: float | None
    tokens_per_joule: float | None
    joules_per_token: float | None
    ttft_ms: float | None  # prefill: time to first token (median forward latency)
    itl_p50_ms: float | None  # decode: inter-token latency, median and 90th percentile of single steps
    itl_p90_ms: float | None
    whole_model_extrapolated: dict[str, Any] | None  # figures x (all layers' params / the N built's), labelled


def window_record(res: BenchResult) -> WindowRecord:
    """The figures of one measured window, each named with its unit."""
    e = res.energy
    dyn_by_dev = dynamic_joules(e, res.idle)
    dyn = float(sum(dyn_by_dev.values())) if dyn_by_dev is not None else None
    ipj, ipj_reason = per_joule(res.inferences, e.joules, "energy")
    dipj, dipj_reason = per_joule(res.inferences, dyn, "dynamic energy (raw minus idle)")
    if dyn_by_dev is None and e.joules_by_device is not None:
        dipj_reason = "idle power not measured (--idle-seconds 0)"
    flags, lat = res.flags + e.flags, res.latency_ms
    if dyn is not None and dyn <= 0:
        flags = flags + [AT_OR_BELOW_ZERO["dynamic_inferences_per_joule"][1]]
    return WindowRecord(
        batch_size=res.batch_size, batches=res.batches, inferences=res.inferences, window_s=res.seconds,
        inferences_per_second=res.inferences_per_second, latency_p50_ms=percentile(lat, 50),
        latency_p90_ms=percentile(lat, 90), latency_p95_ms=percentile(lat, 95),
        latency_mean_ms=statistics.fmean(lat) if lat else None,
        flops_per_inference=res.flops_per_inference, achieved_gflops=res.achieved_gflops,
        energy_j=e.joules, energy_by_device_j=e.joules_by_device, average_power_w=e.average_power_w,
        inferences_per_joule=ipj, inferences_per_joule_reason=ipj_reason, dynamic_energy_j=dyn,
        dynamic_energy_by_device_j=dyn_by_dev, dynamic_average_power_w=dyn / res.seconds if dyn is not None else None,
        dynamic_inferences_per_joule=dipj, dynamic_inferences_per_joule_reason=dipj_reason,
        energy_method=e.method, method_by_device=e.method_by_device, energy_meter=e.meter,
        energy_devices=list(e.devices_covered),
        energy_is_estimate=e.is_estimate or "estimate" in e.method_by_device.values(),
        trace=e.trace, trace_energy_j=e.trace_energy_j(), trace_period_s=e.trace_period_s,
        state_begin=e.state_begin, state_end=e.state_end, power_limit_w=power_limit_read_back(e.state_end),
        cpu_power_limit_w=power_limit_read_back(e.state_end, "cpu_power_limit_w"), flags=flags,
    )


def power_limit_read_back(state: dict[str, dict[str, Any]] | None, key: str = "power_limit_w") -> float | None:
    """The power cap read from the devices at the window's end (the lowest, when devices differ); ``key``
    "cpu_power_limit_w" for the CPU packages' RAPL limit."""
    caps = [float(s[key]) for s in (state or {}).values() if s.get(key) is not None]
    return min(caps) if caps else None


LIMIT_KEYS = ("power_limit_w", "cpu_power_limit_w")


def limit_fields(windows: Sequence[WindowRecord]) -> tuple[dict[str, float | None], list[str]]:
    """A model's power limits: the median of its windows' read-backs, and a flag where they differ."""
    out: dict[str, float | None] = {}
    flags: list[str] = []
    for key in LIMIT_KEYS:
        vals = [w[key] for w in windows if w.get(key) is not None]  # type: ignore[literal-required]
        out[key] = _median(vals)
        if vals and max(vals) - min(vals) > 0.5:
            flags.append(f"{key}: the limit read back changed between windows ({min(vals):g}-{max(vals):g} W)")
    return out, flags


def failed_window(reason: str, batch_size: int, flops: int | None, meter_name: str) -> WindowRecord:
    """A window whose energy could not be measured: every figure None with the reason (never 0 J)."""
    return WindowRecord(
        failed=reason, batch_size=batch_size, flops_per_inference=flops,
        inferences_per_joule_reason=f"window failed: {reason}",
        dynamic_inferences_per_joule_reason=f"window failed: {reason}",
        energy_j=None, inferences_per_joule=None, energy_method="none", energy_meter=meter_name,
        energy_devices=[], energy_is_estimate=False, flags=[f"window failed: {reason}"],
    )


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _partial_note(k: str, windows: Sequence[WindowRecord], kept: int) -> str:
    """Why ``k`` is the median of ``kept`` of the windows: those at or below zero energy, those not measured."""
    n = len(windows)
    energy, words = AT_OR_BELOW_ZERO.get(k, ("", ""))
    lacking = [w for w in windows if w.get(k) is None]  # type: ignore[literal-required]
    low = sum(isinstance(j := w.get(energy), (int, float)) and j <= 0 for w in lacking)  # type: ignore[literal-required]
    parts = [f"{low} of {n} windows had {words}"] if low else []
    if len(lacking) > low:
        parts.append(f"{len(lacking) - low} of {n} windows not measured")
    return f"{k}: {'; '.join(parts)}; the median of the other {kept}"


def summarize(windows: Sequence[WindowRecord]) -> dict[str, Any]:
    """A model's figures over its repeated windows: medians (the flat fields), min/max, every window kept.

    A figure missing from some windows is the median of the others and says so in ``flags``.
    """
    if not windows:
        raise ValueError("summarize needs at least one window")
    out: dict[str, Any] = {}
    flags: list[str] = []
    for k in MEDIAN_KEYS:
        vals = [w[k] for w in windows if w.get(k) is not None]  # type: ignore[literal-required]
        out[k] = _median(vals)
        if vals and len(vals) < len(windows) and k in SPREAD_KEYS:
            flags.append(_partial_note(k, windows, len(vals)))
    for k in SPREAD_KEYS:
        vals = [w[k] for w in windows if w.get(k) is not None]  # type: ignore[literal-required]
        out[f"{k}_min"] = min(vals) if vals else None
        out[f"{k}_max"] = max(vals) if vals else None
    for k in ("inferences_per_joule", "dynamic_inferences_per_joule"):
        out[f"{k}_reason"] = None if out[k] is not None else windows[0].get(f"{k}_reason")
    first = windows[0]
    out.update(batch_size=first["batch_size"], flops_per_inference=first["flops_per_inference"],
               energy_method=weakest([w["energy_method"] for w in windows]), energy_meter=first["energy_meter"],
               energy_devices=first["energy_devices"], energy_is_estimate=any(w["energy_is_estimate"] for w in windows),
               repeats=len(windows), flags=list(dict.fromkeys([*flags, *(f for w in windows for f in w["flags"])])),
               windows=list(windows))
    return out


def summarize_windows(windows: list[WindowRecord]) -> dict[str, Any]:
    """``summarize`` over the windows that measured; failed ones are kept in order and counted."""
    ok = [w for w in windows if not w.get("failed")]
    out = summarize(ok or windows)
    failed = len(windows) - len(ok)
    out.update(windows=list(windows), failed_windows=failed, repeats=len(ok))
    if failed:
        first = next(w["failed"] for w in windows if w.get("failed"))
        note = (f"{failed} of {len(windows)} windows failed ({first}); the figures are from the other {len(ok)}"
                if ok else f"every window failed ({first}): nothing measured")
        out["flags"] = [note] + [f for f in out["flags"] if not f.startswith("window failed")]
    return out


def skipped_record(name: str, fields: dict[str, Any], strategy: str | None, dtype: str, reason: str,
                   status: str = "skipped") -> ModelRecord:
    """A model that was not measured (``status`` "skipped", or "failed" when it broke before its first window):
    its shape and the reason, every figure absent (not 0)."""
    return {  # type: ignore[typeddict-item]
        "name": name, **fields, "strategy": strategy, "dtype": dtype, "status": status, "skipped": reason,
        "accuracy": None, "diverged": None, "train": None, "repeats": 0, "windows": [], "flags": [reason],
        "inferences_per_second": None, "inferences_per_joule": None, "energy_j": None, "average_power_w": None,
        "inferences_per_joule_reason": reason, "energy_method": "none",
    }


def measured_record(name: str, fields: dict[str, Any], strategy: str | None, dtype: str, train: TrainResult | None,
                    accuracy_bench_dtype: float | None, idle: IdlePower | None, windows: list[WindowRecord],
                    optimize: dict[str, Any] | None = None) -> ModelRecord:
    """A measured model: its shape, its training, and the summary of its windows (failed ones counted).

    ``train`` None: a model built, not trained (the LLM-layer family), so no accuracy and no train block.
    """
    rec: ModelRecord = {  # type: ignore[typeddict-item]
        "name": name, **fields, "strategy": strategy, "dtype": dtype, "status": "measured",
        "accuracy": train.test_accuracy if train is not None else None,
        "accuracy_bench_dtype": accuracy_bench_dtype, "diverged": train.diverged if train is not None else None,
        "accuracy_meaningful": train is not None and not train.diverged,
        "train": train.as_dict() if train is not None else None,
        "idle_power_w": idle.power_w if idle is not None else None,
        "idle_power_by_device_w": idle.power_by_device_w if idle is not None else None,
        **summarize_windows(windows),  # the windows' flops_per_inference: the figure they were measured with
    }
    rec["optimize"] = optimize
    limits, limit_flags = limit_fields(windows)
    rec.update(limits)  # type: ignore[typeddict-item]
    rec["flags"] = rec["flags"] + limit_flags
    if train is not None and train.diverged:
        rec["flags"] = [f"{training_note(rec)}: accuracy is meaningless; speed and energy are valid"] + rec["flags"]
    return rec


def training_failure(m: Any) -> str | None:
    """How a model record's training failed, in words ("diverged": a non-finite loss; "did not learn": held-out
    accuracy at chance, as after too few epochs; "untrained": --epochs 0), or None. The stored field for all three
    is ``diverged``; a record written before they were told apart says "diverged"."""
    if not m.get("diverged"):
        return None
    return (m.get("train") or {}).get("failure") or "diverged"


def training_note(m: Any) -> str | None:
    """``training_failure`` as a phrase with its reason ("training diverged (loss is nan in epoch 2)", "untrained
    (--epochs 0: ...)"): the one wording of the record's flag and of the line under the run's table."""
    failure = training_failure(m)
    if failure is None:
        return None
    reason = (m.get("train") or {}).get("diverged_reason")
    return f"{failure if failure == 'untrained' else f'training {failure}'} ({reason})"
