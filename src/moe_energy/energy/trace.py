"""Power traces: a background thread samples power while a window is open (GPU ~10 Hz, CPU from deltas).

The trace is evidence, not the figure: the counter gives the window's joules, the trace shows how power
moved inside the window and cross-checks the counter (``Measurement.cross_check``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_PERIOD_S = 0.1  # ~10 Hz: NVML's power sensor and RAPL both update faster than this

Reading = dict[str, float]


class PowerTrace:
    """Sample ``power()`` (W, instantaneous) or ``energy()`` (J, cumulative) every ``period_s`` seconds.

    With ``energy``, each point is the average power since the previous sample, placed at the interval's
    midpoint: this is how RAPL (an energy counter with no power sensor) yields a power trace.
    """

    def __init__(
        self,
        power: Callable[[], Reading] | None = None,
        energy: Callable[[], Reading] | None = None,
        period_s: float = DEFAULT_PERIOD_S,
    ) -> None:
        if (power is None) == (energy is None):
            raise ValueError("give exactly one of power= or energy=")
        if not period_s > 0:
            raise ValueError("period_s must be > 0")
        self.power, self.energy, self.period_s = power, energy, period_s
        self.points: dict[str, list[list[float]]] = {}
        self.errors: list[str] = []
        self._t0 = 0.0
        self._prev: tuple[float, Reading] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, t0: float | None = None) -> None:
        """Start sampling; times are seconds since ``t0`` (a ``perf_counter`` value, default now)."""
        self._t0 = time.perf_counter() if t0 is None else t0
        self.points = {}
        self.errors = []
        self._prev = None
        self._stop.clear()
        self._sample()  # first point (or the delta baseline) at the window's start
        self._thread = threading.Thread(target=self._loop, name="moe-energy-power-trace", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, list[list[float]]]:
        """Stop, take a last sample at the window's end, and return {device: [[t_s, power_w], ...]}."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample()
        return self.points

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def _sample(self) -> None:
        try:
            now = time.perf_counter()
            if self.power is not None:
                for dev, w in self.power().items():
                    self.points.setdefault(dev, []).append([round(now - self._t0, 4), round(w, 4)])
                return
            assert self.energy is not None
            reading = self.energy()
            now = (now + time.perf_counter()) / 2
            if self._prev is not None:
                t_prev, prev = self._prev
                dt = now - t_prev
                if dt > 1e-4:
                    mid = (t_prev + now) / 2 - self._t0
                    for dev, j in reading.items():
                        if dev in prev:
                            self.points.setdefault(dev, []).append([round(mid, 4), round((j - prev[dev]) / dt, 4)])
            self._prev = (now, reading)
        except Exception as e:  # a failed sample must not kill the window; it is reported instead
            if len(self.errors) < 3:
                self.errors.append(f"power trace sample failed: {e}")
