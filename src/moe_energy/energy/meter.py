"""The meter interface: begin a window, end it, get a Measurement (joules per device, seconds, method).

Shaped after Zeus's ``begin_window``/``end_window``: the caller syncs the device at the window's edges,
the meter only reads counters. A figure nobody measured is ``None`` with a reason, never 0 and never inf.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

# Methods, strongest first. "estimate" is a model, not a reading; "none" means nothing was measured.
METHODS = ("counter", "sampled", "estimate", "none")


@dataclass
class Measurement:
    """Energy over one window. ``joules_by_device`` is None when nothing was measured."""

    seconds: float
    method: str
    meter: str
    joules_by_device: dict[str, float] | None = None
    devices_covered: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def joules(self) -> float | None:
        """Total energy in J over every covered device, or None if not measured."""
        if self.joules_by_device is None:
            return None
        return float(sum(self.joules_by_device.values()))

    @property
    def average_power_w(self) -> float | None:
        j = self.joules
        if j is None or self.seconds <= 0:
            return None
        return j / self.seconds

    @property
    def is_estimate(self) -> bool:
        return self.method == "estimate"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["energy_j"] = self.joules
        d["average_power_w"] = self.average_power_w
        return d


@runtime_checkable
class Meter(Protocol):
    """One source of energy readings. ``begin()`` then ``end()`` gives the window's Measurement."""

    name: str
    method: str

    def begin(self) -> None: ...

    def end(self) -> Measurement: ...


class NullMeter:
    """No energy counter in use: windows are timed, energy is reported as not measured."""

    name = "none"
    method = "none"

    def __init__(self, reason: str = "no meter selected") -> None:
        self.reason = reason
        self._t0: float | None = None

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> Measurement:
        if self._t0 is None:
            raise RuntimeError("end() called before begin()")
        secs = time.perf_counter() - self._t0
        self._t0 = None
        return Measurement(seconds=secs, method="none", meter=self.name, flags=[f"not measured: {self.reason}"])


@dataclass
class WindowHandle:
    """Filled in when the ``window`` block exits."""

    name: str
    result: Measurement | None = None


@contextmanager
def window(meter: Meter, name: str = "window", sync: Callable[[], None] | None = None) -> Iterator[WindowHandle]:
    """Measure the block: sync, begin, run, sync, end. Syncs happen only at the edges."""
    handle = WindowHandle(name)
    if sync is not None:
        sync()
    meter.begin()
    yield handle
    if sync is not None:
        sync()
    handle.result = meter.end()
