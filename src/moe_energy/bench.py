"""The measurement window and its statistics: warm-up, one time-bound loop over one batch with energy read
at the edges, a latency pass apart; then the median and spread over a model's repeated windows.

The counted window has no per-batch device sync (the seed synced every batch, which throttles a GPU);
batch latency comes from a separate, shorter pass so that measuring it cannot slow the counted window.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .energy.idle import IdlePower, dynamic_joules
from .energy.meter import Measurement, Meter, weakest, window

# Windows shorter than this are flagged: energy counters update too coarsely to trust them.
MIN_TRUSTED_SECONDS = 1.0

# Flat per-window figures whose median becomes the model's figure, and those whose min/max are kept too.
MEDIAN_KEYS = (
    "inferences_per_second", "inferences_per_joule", "energy_j", "average_power_w", "dynamic_energy_j",
    "dynamic_average_power_w", "dynamic_inferences_per_joule", "latency_p50_ms", "latency_p95_ms",
    "latency_mean_ms", "achieved_gflops", "window_s", "batches", "inferences",
)
SPREAD_KEYS = ("inferences_per_second", "inferences_per_joule", "dynamic_inferences_per_joule", "energy_j")


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work on ``device``."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def batch_tensors(batch: Any) -> list[Tensor]:
    """Every tensor in a batch given as a tensor, or a (nested) tuple, list or dict of them."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in batch_tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in batch_tensors(v)]
    return []


def infer_batch_size(batch: Any) -> int:
    """Inferences per call: the leading dimension of the batch's first tensor."""
    ts = [t for t in batch_tensors(batch) if t.dim() > 0]
    if not ts:
        raise ValueError("cannot tell the batch size: the input holds no tensor with a leading dimension; "
                         "pass batch_size=")
    return int(ts[0].shape[0])


def caller(model: Callable[..., Any], batch: Any) -> Callable[[], Any]:
    """One forward: model(batch) for a tensor, model(*batch) for a tuple/list, model(**batch) for a dict."""
    if isinstance(batch, dict):
        return lambda: model(**batch)
    if isinstance(batch, (tuple, list)):
        return lambda: model(*batch)
    return lambda: model(batch)


def _per_joule(inferences: int, joules: float | None, what: str) -> tuple[float | None, str | None]:
    """inferences / J, or None and the reason (never inf, never from a zero or negative)."""
    if joules is None:
        return None, f"{what} not measured"
    if not math.isfinite(joules) or joules <= 0:
        return None, f"{what} reads {joules:.3g} J (zero or below): no inferences/J from it"
    return inferences / joules, None


@dataclass
class BenchResult:
    batch_size: int
    batches: int
    seconds: float
    flops_per_inference: int | None  # None: not known for this model (achieved_gflops then None too)
    latency_ms: list[float]
    energy: Measurement
    flags: list[str] = field(default_factory=list)
    idle: IdlePower | None = None

    @property
    def inferences(self) -> int:
        return self.batches * self.batch_size

    @property
    def inferences_per_second(self) -> float:
        return self.inferences / self.seconds

    @property
    def achieved_gflops(self) -> float | None:
        if self.flops_per_inference is None:
            return None
        return self.inferences * self.flops_per_inference / self.seconds / 1e9

    @property
    def inferences_per_joule(self) -> float | None:
        """None (never inf) when energy was not measured or reads as zero."""
        return _per_joule(self.inferences, self.energy.joules, "energy")[0]

    def latency_pct(self, q: float) -> float | None:
        if not self.latency_ms:
            return None
        xs = sorted(self.latency_ms)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    def metrics(self) -> dict[str, Any]:
        """Flat figures of this window, each named with its unit."""
        e = self.energy
        j = e.joules
        dyn_by_dev = dynamic_joules(e, self.idle)
        dyn = float(sum(dyn_by_dev.values())) if dyn_by_dev is not None else None
        ipj, ipj_reason = _per_joule(self.inferences, j, "energy")
        dipj, dipj_reason = _per_joule(self.inferences, dyn, "dynamic energy (raw minus idle)")
        if dyn_by_dev is None and e.joules_by_device is not None:
            dipj_reason = "idle power not measured (--idle-seconds 0)"
        flags = self.flags + e.flags
        if dyn is not None and dyn <= 0:
            flags = flags + ["dynamic energy <= 0: the window drew no more than idle power"]
        return {
            "batch_size": self.batch_size,
            "batches": self.batches,
            "inferences": self.inferences,
            "window_s": self.seconds,
            "inferences_per_second": self.inferences_per_second,
            "latency_p50_ms": self.latency_pct(50),
            "latency_p95_ms": self.latency_pct(95),
            "latency_mean_ms": statistics.fmean(self.latency_ms) if self.latency_ms else None,
            "flops_per_inference": self.flops_per_inference,
            "achieved_gflops": self.achieved_gflops,
            "energy_j": j,
            "energy_by_device_j": e.joules_by_device,
            "average_power_w": e.average_power_w,
            "inferences_per_joule": ipj,
            "inferences_per_joule_reason": ipj_reason,
            "dynamic_energy_j": dyn,
            "dynamic_energy_by_device_j": dyn_by_dev,
            "dynamic_average_power_w": dyn / self.seconds if dyn is not None else None,
            "dynamic_inferences_per_joule": dipj,
            "dynamic_inferences_per_joule_reason": dipj_reason,
            "energy_method": e.method,
            "method_by_device": e.method_by_device,
            "energy_meter": e.meter,
            "energy_devices": list(e.devices_covered),
            "energy_is_estimate": e.is_estimate or "estimate" in e.method_by_device.values(),
            "trace": e.trace,
            "trace_energy_j": e.trace_energy_j(),
            "trace_period_s": e.trace_period_s,
            "state_begin": e.state_begin,
            "state_end": e.state_end,
            "flags": flags,
        }


@torch.inference_mode()
def measure(
    model: nn.Module,
    batch: Any,
    duration: float,
    meter: Meter,
    flops_per_inference: int | None,
    warmup: float = 2.0,
    latency_seconds: float | None = None,
    on_tick: Callable[[float], None] | None = None,
    idle: IdlePower | None = None,
    sync: Callable[[], None] | None = None,
    batch_size: int | None = None,
) -> BenchResult:
    """Run ``model(batch)`` for ``duration`` seconds inside one energy window.

    ``batch`` is a tensor, or a tuple/list (``model(*batch)``) or dict (``model(**batch)``) of inputs;
    ``batch_size`` (inferences per call) defaults to its first tensor's leading dimension.
    ``sync`` defaults to the batch's device sync; it runs at the window's edges only, never inside.
    """
    model.eval()
    forward = caller(model, batch)
    if batch_size is None:
        batch_size = infer_batch_size(batch)
    if sync is None:
        devices = [t.device for t in batch_tensors(batch) if t.device.type != "cpu"]
        sync = device_sync(devices[0] if devices else torch.device("cpu"))
    # Untimed warm-up: allocator, kernels' first launch, caches, clocks ramping up.
    t0 = time.perf_counter()
    n = 0
    while n < 3 or time.perf_counter() - t0 < warmup:
        forward()
        n += 1
    sync()

    batches = 0
    last_tick = 0.0
    with window(meter, "bench", sync) as w:
        start = time.perf_counter()
        while True:
            forward()
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= duration:
                break
            if on_tick is not None and elapsed - last_tick >= 0.2:
                on_tick(elapsed)
                last_tick = elapsed
        # the window's context manager syncs before reading the meter, so queued batches count
    seconds = time.perf_counter() - start
    assert w.result is not None
    flags: list[str] = []
    if seconds < MIN_TRUSTED_SECONDS:
        flags.append(f"window of {seconds:.2f} s is shorter than {MIN_TRUSTED_SECONDS:g} s: energy unreliable")
    if w.result.joules is not None and w.result.joules <= 0:
        flags.append("zero-joule reading: inferences_per_joule withheld")

    # Latency pass, outside the counted window: each batch timed with a sync on both sides.
    lat: list[float] = []
    budget = latency_seconds if latency_seconds is not None else min(2.0, 0.1 * duration)
    t_lat = time.perf_counter()
    while len(lat) < 10 or (time.perf_counter() - t_lat < budget and len(lat) < 200):
        sync()
        a = time.perf_counter()
        forward()
        sync()
        lat.append((time.perf_counter() - a) * 1e3)
    return BenchResult(batch_size, batches, seconds, flops_per_inference, lat, w.result, flags, idle)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A model's figures over its repeated windows: medians (the flat fields), min/max, every window kept.

    ``windows`` are ``BenchResult.metrics()`` dicts (plus any bookkeeping such as ``repeat``), in run order.
    A figure missing from some windows is the median of the others and says so in ``flags``.
    """
    if not windows:
        raise ValueError("summarize needs at least one window")
    out: dict[str, Any] = {}
    flags: list[str] = []
    for k in MEDIAN_KEYS:
        vals = [w[k] for w in windows if w.get(k) is not None]
        out[k] = _median(vals)
        if vals and len(vals) < len(windows) and k in SPREAD_KEYS:
            flags.append(f"{k}: median of {len(vals)} of {len(windows)} windows (the others not measured)")
    for k in SPREAD_KEYS:
        vals = [w[k] for w in windows if w.get(k) is not None]
        out[f"{k}_min"] = min(vals) if vals else None
        out[f"{k}_max"] = max(vals) if vals else None
    for k in ("inferences_per_joule", "dynamic_inferences_per_joule"):
        out[f"{k}_reason"] = None if out[k] is not None else windows[0].get(f"{k}_reason")
    first = windows[0]
    out["batch_size"] = first["batch_size"]
    out["flops_per_inference"] = first["flops_per_inference"]
    out["energy_method"] = weakest([w["energy_method"] for w in windows])
    out["energy_meter"] = first["energy_meter"]
    out["energy_devices"] = first["energy_devices"]
    out["energy_is_estimate"] = any(w["energy_is_estimate"] for w in windows)
    out["repeats"] = len(windows)
    for w in windows:
        for f in w["flags"]:
            if f not in flags:
                flags.append(f)
    out["flags"] = flags
    out["windows"] = list(windows)
    return out
