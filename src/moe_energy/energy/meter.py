"""The meter interface: begin a window, end it, get a Measurement (joules per device, seconds, method).

Shaped after Zeus's ``begin_window``/``end_window``: the caller syncs the device at the window's edges,
the meter only reads counters. A figure nobody measured is ``None`` with a reason, never 0 and never inf.

Methods, strongest first:
  counter   a hardware energy counter read at the window's edges (NVML total energy, RAPL energy_uj)
  sampled   power samples integrated over the window (GPUs older than Volta)
  estimate  a model, not a reading (CPU TDP x process CPU utilisation); always labelled, never compared
            silently with a measured figure
  none      nothing was measured

The window and model records built from Measurements are declared in ``measure/records.py``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError
from .trace import DEFAULT_PERIOD_S, PowerTrace

METHODS = ("counter", "sampled", "estimate", "none")

# A trace integral further than this from the counter's joules is flagged.
TRACE_TOLERANCE = 0.05

# device -> (the most watts it can draw, where that ceiling comes from)
Ceilings = dict[str, tuple[float, str]]


class ImpossibleReading(RuntimeError):
    """A window's counter implies a power no device draws (below zero, above its ceiling): the figure is a
    lie of the counter (a reset, a wrap its range does not explain), so the window fails instead."""


def impossible(joules: dict[str, float], seconds: float, ceilings: Ceilings, stale_s: float = 0.0) -> list[str]:
    """One reason per device whose implied power is below zero or above its ceiling; [] when all are possible.

    ``stale_s`` is how old a counter's reading can be (its update period): the joules read may span that much
    more than the window, which matters only for windows of a few milliseconds. A non-finite reading is left
    to the caller (GuardedMeter rejects it by name)."""
    out: list[str] = []
    for dev, j in joules.items():
        if not isinstance(j, (int, float)) or not math.isfinite(j) or seconds <= 0:
            continue
        w = j / seconds
        if j < 0:
            out.append(f"{dev}: {j:.4g} J in {seconds:.3g} s ({w:.4g} W) is below zero: the counter went backwards")
        elif dev in ceilings and j > ceilings[dev][0] * (seconds + stale_s):
            cap, source = ceilings[dev]
            out.append(f"{dev}: {j:.4g} J in {seconds:.3g} s is {w:.4g} W, above its {cap:g} W ceiling ({source})")
    return out


LABELS = ("estimate:",)  # flags a meter puts on every window to name its method (``_labels``): not faults


def faults(flags: Iterable[object]) -> list[str]:
    """The flags that say something went wrong, without the labels that only name a method (an estimate is
    labelled and compared only with estimates, never kept out for being one)."""
    return [f for f in flags if isinstance(f, str) and not f.startswith(LABELS)]


def weakest(methods: list[str]) -> str:
    """The least trustworthy of several methods (a sum is only as good as its weakest part)."""
    return max(methods, key=METHODS.index) if methods else "none"


@dataclass
class Measurement:
    """Energy over one window. ``joules_by_device`` is None when nothing was measured."""

    seconds: float
    method: str
    meter: str
    joules_by_device: dict[str, float] | None = None
    devices_covered: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    # device -> [[t_s since window start, power_w], ...]; None when the meter does not sample power
    trace: dict[str, list[list[float]]] | None = None
    trace_period_s: float | None = None
    # device -> method, for composite meters whose parts differ (GPU counter + RAPL counter, say)
    method_by_device: dict[str, str] = field(default_factory=dict)
    # device -> {temperature_c, sm_clock_mhz, power_limit_w} at the window's edges, where available
    state_begin: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_end: dict[str, dict[str, Any]] = field(default_factory=dict)
    # device -> the seconds its own window lasted, where that is not ``seconds`` (a job's ranks each measure their
    # own window; the job's is the longest): its idle share and its trace's integral are over its own seconds
    seconds_by_device: dict[str, float] = field(default_factory=dict)

    def seconds_of(self, device: str) -> float:
        return self.seconds_by_device.get(device, self.seconds)

    @property
    def joules(self) -> float | None:
        """Total energy in J over every covered device, or None if not measured."""
        return None if self.joules_by_device is None else float(sum(self.joules_by_device.values()))

    @property
    def average_power_w(self) -> float | None:
        j = self.joules
        return None if j is None or self.seconds <= 0 else j / self.seconds

    @property
    def is_estimate(self) -> bool:
        return self.method == "estimate"

    def trace_energy_j(self) -> dict[str, float] | None:
        """Each device's trace integrated over the window (ends held flat to the window's edges)."""
        if not self.trace:
            return None
        return {dev: integrate(pts, self.seconds_of(dev)) for dev, pts in self.trace.items() if pts}

    def cross_check(self) -> None:
        """Flag each device whose trace integral is more than 5 % from its counter's joules."""
        te = self.trace_energy_j()
        if not te or self.joules_by_device is None:
            return
        for dev, tj in te.items():
            cj = self.joules_by_device.get(dev)
            if cj is None or cj <= 0 or self.method_by_device.get(dev, self.method) != "counter":
                continue  # cj <= 0: the zero-joule flag already says it
            if abs(tj - cj) / cj > TRACE_TOLERANCE:
                self.flags.append(
                    f"{dev}: power trace integrates to {tj:.2f} J but the counter says {cj:.2f} J "
                    f"({(tj - cj) / cj:+.0%}, over {TRACE_TOLERANCE:.0%})"
                )

    def as_dict(self) -> dict:
        return {**asdict(self), "energy_j": self.joules, "average_power_w": self.average_power_w,
                "trace_energy_j": self.trace_energy_j()}


def integrate(points: list[list[float]], seconds: float) -> float:
    """Trapezoid integral (J) of [[t_s, W], ...] over [0, seconds], holding the first/last sample flat."""
    pts = sorted((max(0.0, min(seconds, t)), w) for t, w in points)
    if not pts:
        return 0.0
    total = pts[0][0] * pts[0][1] + (seconds - pts[-1][0]) * pts[-1][1]
    for (t0, w0), (t1, w1) in zip(pts, pts[1:]):
        total += (t1 - t0) * (w0 + w1) / 2
    return total


@runtime_checkable
class Meter(Protocol):
    """One source of energy readings. ``begin()`` then ``end()`` gives the window's Measurement."""

    name: str
    method: str

    def begin(self) -> None: ...

    def end(self) -> Measurement: ...


class MeterBase:
    """What every meter class shares: ``with meter.window("name") as w:`` measures a block of work."""

    name: str
    method: str
    devices: list[str]

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> Measurement:
        raise NotImplementedError

    def window(self, name: str = "window", sync: Callable[[], None] | None = None
               ) -> AbstractContextManager[WindowHandle]:
        """Measure the block; ``sync`` (default: every GPU in use) runs at both edges, never inside."""
        return window(self, name, sync if sync is not None else lambda: sync_accelerators(self))

    def abort(self) -> None:
        """Close an open window without a reading (a read failed, or the run was interrupted)."""
        abort(self)

    _t0: float | None = None

    def _refuse_open(self) -> None:
        """A ConfigError when a window of this meter is open: a second ``begin()`` would restart its clock and
        counter under it (and leave its power-trace thread running), so the outer window could never end."""
        if self._t0 is not None:
            raise ConfigError(f"meter {self.name!r}: a window is already open on it (windows of one meter do not "
                              "nest or overlap); end that window first, or measure with another meter")

    def _start_clock(self) -> None:
        self._t0 = time.perf_counter()

    def _stop_clock(self) -> float:
        """Seconds since ``_start_clock``; the window is closed, so ``end()`` twice is an error."""
        if self._t0 is None:
            raise RuntimeError("end() called before begin()")
        secs = time.perf_counter() - self._t0
        self._t0 = None
        return secs


class CounterMeter(MeterBase):
    """A cumulative counter read at the window's edges, with a power trace sampled in between.

    The window's shape is written once here, so that every counter is read the same way: device state,
    sampler, then the clock and the counter back to back (right after the caller's sync) at both edges,
    flags, cross-check. A meter supplies ``_read`` (and ``name``, ``method``, ``devices``); the other hooks
    have defaults for a counter of cumulative joules per device.
    """

    _trace: PowerTrace | None = None
    # How old a counter reading can be (its update period), allowed for when judging a window's power.
    stale_s: float = 0.0

    def __init__(self, trace_period_s: float = DEFAULT_PERIOD_S) -> None:
        self.trace_period_s = trace_period_s
        self._e0: dict[str, float] = {}
        self._state0: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, float]:
        """The counter now: cumulative joules per device (or any unit ``_delta`` turns into joules)."""
        raise NotImplementedError

    def _delta(self, begin: dict[str, float], end: dict[str, float], seconds: float,
               trace: dict[str, list[list[float]]]) -> dict[str, float]:
        """Joules per device over the window; a device missing from either reading is left out."""
        return {d: end[d] - begin[d] for d in self.devices if d in end and d in begin}

    def _sampler(self) -> PowerTrace:
        """The window's power trace: by default the counter's own deltas (RAPL has no power sensor)."""
        return PowerTrace(energy=self._read, period_s=self.trace_period_s)

    def _state(self) -> dict[str, dict[str, Any]]:
        """Device state (temperature, clocks, limits) at an edge, per device; none by default."""
        return {}

    def _labels(self) -> list[str]:
        """Flags every window of this meter carries (an estimate says so), before the window's own."""
        return []

    def _flags(self, joules: dict[str, float], seconds: float) -> list[str]:
        """This window's warnings, after the trace's errors: by default each counter that did not advance."""
        return [f"{d}: {self.name} counter did not advance (zero-joule reading)" for d, j in joules.items() if j <= 0]

    def begin(self) -> None:
        self._refuse_open()
        try:
            self._state0 = self._state()
            self._trace = self._sampler()
            self._trace.start()
            self._start_clock()  # the clock and the counter are read back to back, as in end()
            self._e0 = self._read()
        except BaseException:
            abort(self)  # a failed read must not leave the trace sampling and the window open
            raise

    def _ceilings(self, state_end: dict[str, dict[str, Any]]) -> Ceilings:
        """Each device's most plausible watts; none by default (only a negative reading is impossible)."""
        return {}

    def _problems(self, joules: dict[str, float], seconds: float,
                  state_end: dict[str, dict[str, Any]]) -> list[str]:
        """Why this window's reading cannot be true ([] when it can): a negative or impossible power."""
        return impossible(joules, seconds, self._ceilings(state_end), self.stale_s)

    def end(self) -> Measurement:
        """The window's Measurement; raises ImpossibleReading rather than return a figure no device drew."""
        if self._t0 is None or self._trace is None:
            raise RuntimeError("end() called before begin()")
        try:
            e1 = self._read()  # right after the caller's sync
        except BaseException:
            abort(self)
            raise
        secs = self._stop_clock()
        sampler, self._trace = self._trace, None
        trace = sampler.stop()
        state_end = self._state()
        joules = self._delta(self._e0, e1, secs, trace)
        problems = self._problems(joules, secs, state_end)
        if problems:
            raise ImpossibleReading("; ".join(problems))
        flags = self._labels() + list(sampler.errors) + self._flags(joules, secs)
        m = Measurement(seconds=secs, method=self.method, meter=self.name, joules_by_device=joules,
                        devices_covered=list(self.devices), flags=flags, trace=trace,
                        trace_period_s=self.trace_period_s, method_by_device={d: self.method for d in joules},
                        state_begin=self._state0, state_end=state_end)
        m.cross_check()
        return m

    def _versions(self) -> dict[str, Any]:
        """Driver and library versions for the results document."""
        return {}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "devices": list(self.devices),
                "versions": self._versions()}


def abort(meter: Meter) -> None:
    """Stop whatever an open window left running (power-trace threads), in ``meter`` and its parts.

    Called after ``begin()``/``end()`` raised or the measured block was interrupted, so that no sampler
    outlives its window and the next ``begin()`` starts clean. Never raises.
    """
    for part in getattr(meter, "meters", []) or []:
        abort(part)
    trace = getattr(meter, "_trace", None)
    with contextlib.suppress(Exception):  # cleanup after a failure must not raise a second one
        if trace is not None:
            trace.stop()
    for attr in ("_trace", "_t0"):
        if hasattr(meter, attr):
            with contextlib.suppress(AttributeError):
                setattr(meter, attr, None)


def sync_accelerators(meter: Meter | None = None) -> None:
    """Wait for queued work on the current CUDA device, the meter's GPUs (devices "gpu:N") and MPS.

    Only devices torch has already started are touched: a CPU-only run (or torch never imported) is a no-op,
    and no GPU gets a context just because a window asked for a sync.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        for dev in getattr(meter, "devices", []):
            kind, _, index = dev.partition(":")
            if kind == "gpu" and index.isdigit() and int(index) < torch.cuda.device_count():
                torch.cuda.synchronize(int(index))
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.synchronize()


class NullMeter(MeterBase):
    """No energy counter in use: windows are timed, energy is reported as not measured."""

    name = "none"
    method = "none"
    devices: list[str] = []

    def __init__(self, reason: str = "no meter selected") -> None:
        self.reason = reason

    def begin(self) -> None:
        self._refuse_open()
        self._start_clock()

    def end(self) -> Measurement:
        secs = self._stop_clock()
        return Measurement(seconds=secs, method="none", meter=self.name, flags=[f"not measured: {self.reason}"])

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "devices": [], "versions": {}, "reason": self.reason}


class CompositeMeter(MeterBase):
    """Several meters read over the same window; each device reported separately, the total summed.

    Used by ``--meter auto`` on a GPU host: the GPU's counter and RAPL's CPU package/DRAM counters.
    """

    def __init__(self, meters: list[Meter]) -> None:
        if not meters:
            raise ValueError("CompositeMeter needs at least one meter")
        self.meters = meters
        self.name = "+".join(m.name for m in meters)
        self.method = weakest([m.method for m in meters])
        self.devices = [d for m in meters for d in getattr(m, "devices", [])]

    def begin(self) -> None:
        self._refuse_open()
        begun: list[Meter] = []
        try:
            for m in self.meters:
                m.begin()
                begun.append(m)
        except BaseException:
            for m in begun:  # the parts begun before the failure: their traces stop, their windows close
                abort(m)
            raise
        self._start_clock()

    def end(self) -> Measurement:
        secs = self._stop_clock()
        try:
            parts = [m.end() for m in self.meters]
        except BaseException:
            abort(self)  # one part's failure (an impossible reading) must not leave the others' windows open
            raise
        out = Measurement(seconds=secs, method=weakest([p.method for p in parts]), meter=self.name)
        joules: dict[str, float] = {}
        trace: dict[str, list[list[float]]] = {}
        measured = False
        for p in parts:
            out.devices_covered += p.devices_covered
            out.flags += p.flags
            out.state_begin.update(p.state_begin)
            out.state_end.update(p.state_end)
            if p.joules_by_device is not None:
                measured = True
                joules.update(p.joules_by_device)
                for dev in p.joules_by_device:
                    out.method_by_device[dev] = p.method_by_device.get(dev, p.method)
            if p.trace:
                trace.update(p.trace)
            if p.trace_period_s is not None:
                out.trace_period_s = min(out.trace_period_s or p.trace_period_s, p.trace_period_s)
        out.joules_by_device = joules if measured else None
        out.trace = trace or None
        return out

    def info(self) -> dict[str, Any]:
        parts = [meter_info(m) for m in self.meters]
        versions = {k: v for p in parts for k, v in p.get("versions", {}).items()}
        return {"name": self.name, "method": self.method, "devices": self.devices, "versions": versions,
                "parts": parts}


def counter_traced(meter: Meter) -> list[str]:
    """The devices whose power trace is their counter's own reads (``CounterMeter``'s default sampler: RAPL, Apple's
    SoC, the estimate have no power sensor): there a trace agrees with its counter by construction unless the sampler
    lost reads or ran unevenly, so comparing them checks the sampler, not the counter."""
    out: list[str] = []
    for part in getattr(meter, "meters", None) or [meter]:
        if isinstance(part, CounterMeter) and part._sampler().energy is not None:
            out += part.devices
    return out


def meter_info(meter: Meter) -> dict[str, Any]:
    """Metadata for the results document: name, method, devices covered, driver and library versions."""
    info = getattr(meter, "info", None)
    if callable(info):
        return info()
    return {"name": meter.name, "method": meter.method, "devices": list(getattr(meter, "devices", [])),
            "versions": {}}


@dataclass
class WindowHandle:
    """Filled in when the ``window`` block exits."""

    name: str
    result: Measurement | None = None


@contextmanager
def window(meter: Meter, name: str = "window", sync: Callable[[], None] | None = None) -> Iterator[WindowHandle]:
    """Measure the block: sync, begin, run, sync, end. Syncs happen only at the edges.

    If the block or the closing sync raises (an error, Ctrl-C, SIGTERM) the window is closed and its reading
    discarded."""
    handle = WindowHandle(name)
    if sync is not None:
        sync()
    meter.begin()
    try:
        yield handle
        if sync is not None:
            sync()  # an asynchronous device error (or Ctrl-C) may surface here, not in the block
    except BaseException:
        abort(meter)  # the block failed or was interrupted: close the window, discard its reading
        raise
    handle.result = meter.end()
