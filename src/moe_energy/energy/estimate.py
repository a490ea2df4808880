"""The estimate meter, for hosts with no energy counter (VMs, most containers): a model, not a reading.

power_w = CPU TDP x the process's CPU utilisation, i.e. energy_j = TDP / logical CPUs x process CPU seconds.
TDP comes from ``--cpu-tdp-watts``, else DEFAULT_WATTS_PER_CPU x logical CPUs. Idle, uncore, DRAM and
turbo above TDP are all ignored, so the figure is only good for a rough order of magnitude: every number
from this meter carries method ``estimate`` and is labelled as such wherever it is shown.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .meter import Measurement, MeterBase
from .trace import DEFAULT_PERIOD_S, PowerTrace

# 5 W per logical CPU: a desktop part (65-125 W over 12-24 threads) or a server part (200-350 W over
# 64-128 threads) lands between 2.5 and 10 W per thread; 5 W sits in the middle of that range.
DEFAULT_WATTS_PER_CPU = 5.0

DEVICE = "cpu:estimate"


class EstimateMeter(MeterBase):
    """Estimated CPU energy from the process's CPU time; never a measurement."""

    name = "estimate"
    method = "estimate"

    def __init__(self, tdp_watts: float | None = None, cpus: int | None = None,
                 trace_period_s: float = DEFAULT_PERIOD_S) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.tdp_source = "--cpu-tdp-watts" if tdp_watts is not None else \
            f"default {DEFAULT_WATTS_PER_CPU:g} W x {self.cpus} logical CPUs"
        self.tdp_watts = float(tdp_watts) if tdp_watts is not None else DEFAULT_WATTS_PER_CPU * self.cpus
        if not self.tdp_watts > 0:
            raise ValueError("tdp_watts must be > 0")
        self.devices = [DEVICE]
        self.trace_period_s = trace_period_s
        self._trace: PowerTrace | None = None
        self._t0: float | None = None
        self._e0 = 0.0

    def _energy(self) -> dict[str, float]:
        """The model's cumulative joules: TDP x (CPU seconds of all this process's threads) / CPUs."""
        return {DEVICE: self.tdp_watts * time.process_time() / self.cpus}

    def begin(self) -> None:
        self._trace = PowerTrace(energy=self._energy, period_s=self.trace_period_s)
        self._trace.start()
        self._t0 = time.perf_counter()
        self._e0 = self._energy()[DEVICE]

    def end(self) -> Measurement:
        if self._t0 is None or self._trace is None:
            raise RuntimeError("end() called before begin()")
        j = self._energy()[DEVICE] - self._e0
        secs = time.perf_counter() - self._t0
        trace = self._trace.stop()
        flags = [f"estimate: {self.tdp_watts:g} W TDP ({self.tdp_source}) x process CPU utilisation, "
                 "not a measurement"] + self._trace.errors
        if j <= 0:
            flags.append(f"{DEVICE}: the process used no CPU time in the window (zero-joule estimate)")
        self._t0, self._trace = None, None
        return Measurement(seconds=secs, method=self.method, meter=self.name, joules_by_device={DEVICE: j},
                           devices_covered=list(self.devices), flags=flags, trace=trace,
                           trace_period_s=self.trace_period_s, method_by_device={DEVICE: self.method})

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "devices": list(self.devices),
                "versions": {}, "tdp_watts": self.tdp_watts, "tdp_source": self.tdp_source,
                "logical_cpus": self.cpus}
