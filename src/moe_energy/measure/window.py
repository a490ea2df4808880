"""The one measurement window: warm-up, a counted loop over one batch with energy read at its edges, and a
latency pass apart. Every command's windows (run, sweep, API, selfcheck, expert parallelism) run here.

The counted loop has no per-batch device sync (the seed synced every batch, which throttles a GPU); batch
latency comes from a separate, shorter pass so that measuring it cannot slow the counted window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..device import device_sync
from ..energy.contention import CpuShare
from ..energy.idle import IdlePower
from ..energy.meter import Measurement, Meter, window

# Windows shorter than this are flagged: energy counters update too coarsely to trust them.
MIN_TRUSTED_SECONDS = 1.0
TICK_S = 0.2  # progress callbacks at most this often
LATENCY_STRETCH = 2.0  # the latency pass may run this many times its budget to reach its least count


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


def batch_sync(batch: Any) -> Callable[[], None]:
    """The sync of the device the batch lives on (the first non-CPU tensor's; a no-op on the CPU)."""
    devices = [t.device for t in batch_tensors(batch) if t.device.type != "cpu"]
    return device_sync(devices[0] if devices else torch.device("cpu"))


def per_joule(inferences: int, joules: float | None, what: str) -> tuple[float | None, str | None]:
    """inferences / J, or None and the reason (never inf, never from a zero or negative)."""
    if joules is None:
        return None, f"{what} not measured"
    if not math.isfinite(joules) or joules <= 0:
        return None, f"{what} reads {joules:.3g} J (zero or below): no inferences/J from it"
    return inferences / joules, None


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile of ``xs``; None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class BenchResult:
    """One window's raw outcome; ``measure.records.window_record`` turns it into the record's figures."""

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
        return per_joule(self.inferences, self.energy.joules, "energy")[0]


def warm_up(forward: Callable[[], Any], sync: Callable[[], None], seconds: float, at_least: int = 3) -> None:
    """Untimed calls: allocator, kernels' first launch, caches, clocks ramping up. With ``seconds`` > 0 they fill
    that time, one call at least (a forward longer than the warm-up paid its one-off costs in that call: an LLM
    layer's prefill chunk takes seconds on a CPU); with 0, exactly ``at_least`` (every EP rank makes as many)."""
    least = 1 if seconds > 0 else at_least
    t0 = time.perf_counter()
    n = 0
    while n < least or time.perf_counter() - t0 < seconds:
        forward()
        n += 1
    sync()


def warm_up_for(warmup: float, last_call_s: float | None) -> float | None:
    """A window's warm-up: none (None) when an earlier window's call of the same model outlasted ``warmup``, whose
    one-off costs (allocation, first launch) that window's warm-up paid: another call, a minute for a dense prefill
    on a CPU, would only cost time. Else ``warmup`` (0: the fixed count every rank of a job makes)."""
    return None if last_call_s is not None and 0 < warmup <= last_call_s else warmup


def counted_window(forward: Callable[[], Any], meter: Meter, sync: Callable[[], None], duration: float,
                   batches: int | None = None, on_tick: Callable[[float], None] | None = None,
                   others: bool = True) -> tuple[int, float, Measurement, list[str]]:
    """(batches, seconds, measurement, flags) of one energy window: ``duration`` seconds of forwards, or
    exactly ``batches`` of them (expert parallelism: every rank must run as many collectives). ``others``: flag
    the window when other processes kept the CPUs busy (``contention``; off where they are the job's own ranks)."""
    n = 0
    last_tick = 0.0
    cpu = CpuShare()
    cpu.begin()
    with window(meter, "bench", sync) as w:
        start = time.perf_counter()
        while True:
            forward()
            n += 1
            elapsed = time.perf_counter() - start
            if (n >= batches) if batches is not None else (elapsed >= duration):
                break
            if on_tick is not None and elapsed - last_tick >= TICK_S:
                on_tick(elapsed)
                last_tick = elapsed
        # the window's context manager syncs before reading the meter, so queued batches count
    assert w.result is not None
    # the meter's own seconds, from its counter's first reading to its last: the span its joules cover, so that
    # inferences/s / W is inferences/J and dynamic W is W - idle W. A clock read here would add what closing the
    # window costs after the last reading (a power trace's thread joined, the devices' state read) to the work.
    seconds = w.result.seconds
    use = cpu.end(seconds)
    flags: list[str] = []
    if seconds < MIN_TRUSTED_SECONDS:
        flags.append(f"window of {seconds:.2f} s is shorter than {MIN_TRUSTED_SECONDS:g} s: energy unreliable")
    if w.result.joules is not None and w.result.joules <= 0:
        flags.append("zero-joule reading: inferences_per_joule withheld")
    if others and use is not None and (crowded := use.flag()):
        flags.append(crowded)
    return n, seconds, w.result, flags


def latency_pass(forward: Callable[[], Any], sync: Callable[[], None], budget_s: float, at_least: int = 10,
                 at_most: int = 200) -> list[float]:
    """ms of single synced forwards, outside the counted window: more while within ``budget_s``, ``at_least``
    of them while within LATENCY_STRETCH x ``budget_s`` (ten forwards of seconds each would outlast the
    windows), one at least; with ``budget_s`` 0 and ``at_least == at_most``, a fixed count, as collectives need."""
    lat: list[float] = []
    t0 = time.perf_counter()

    def more() -> bool:
        elapsed = time.perf_counter() - t0
        if not lat:
            return True
        if len(lat) >= at_most:
            return False
        return elapsed < budget_s or (len(lat) < at_least and (budget_s <= 0 or elapsed < LATENCY_STRETCH * budget_s))

    while more():
        sync()
        a = time.perf_counter()
        forward()
        sync()
        lat.append((time.perf_counter() - a) * 1e3)
    return lat


def latency_budget(duration: float) -> float:
    """Seconds the latency pass may take after a window of ``duration``."""
    return min(2.0, 0.1 * duration)


@torch.inference_mode()
def measure(
    model: Callable[..., Any],
    batch: Any,
    duration: float,
    meter: Meter,
    flops_per_inference: int | None,
    warmup: float | None = 2.0,
    on_tick: Callable[[float], None] | None = None,
    idle: IdlePower | None = None,
    sync: Callable[[], None] | None = None,
    batch_size: int | None = None,
) -> BenchResult:
    """Run ``model(batch)`` for ``duration`` seconds inside one energy window.

    ``batch`` is a tensor, or a tuple/list (``model(*batch)``) or dict (``model(**batch)``) of inputs;
    ``batch_size`` (inferences per call) defaults to its first tensor's leading dimension.
    ``sync`` defaults to the batch's device sync; it runs at the window's edges only, never inside.
    ``warmup`` None: no warm-up call (``warm_up_for``).
    """
    if isinstance(model, nn.Module):
        model.eval()
    forward = caller(model, batch)
    batch_size = infer_batch_size(batch) if batch_size is None else batch_size
    sync = batch_sync(batch) if sync is None else sync
    if warmup is not None:
        warm_up(forward, sync, warmup)
    n, seconds, energy, flags = counted_window(forward, meter, sync, duration, on_tick=on_tick)
    budget = latency_budget(duration)
    # A window of one call that outlasted the latency budget (a prefill of seconds) is itself that call's latency,
    # synced at both edges: a pass to time it again would cost as much once more.
    lat = [seconds * 1e3] if n == 1 and seconds >= budget else latency_pass(forward, sync, budget)
    return BenchResult(batch_size, n, seconds, flops_per_inference, lat, energy, flags, idle)


def fixed_count(per_batch_s: float, seconds: float, at_most: int | None = None) -> int:
    """Batches that fill ``seconds`` at ``per_batch_s`` each (at least one)."""
    n = max(1, math.ceil(seconds / max(per_batch_s, 1e-9)))
    return min(n, at_most) if at_most is not None else n
