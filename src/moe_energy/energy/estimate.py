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

from .meter import CounterMeter
from .trace import DEFAULT_PERIOD_S

# 5 W per logical CPU: a desktop part (65-125 W over 12-24 threads) or a server part (200-350 W over
# 64-128 threads) lands between 2.5 and 10 W per thread; 5 W sits in the middle of that range.
DEFAULT_WATTS_PER_CPU = 5.0

DEVICE = "cpu:estimate"


class EstimateMeter(CounterMeter):
    """Estimated CPU energy from the process's CPU time; never a measurement."""

    name = "estimate"
    method = "estimate"

    def __init__(self, tdp_watts: float | None = None, cpus: int | None = None,
                 trace_period_s: float = DEFAULT_PERIOD_S) -> None:
        super().__init__(trace_period_s)
        self.cpus = cpus or os.cpu_count() or 1
        self.tdp_source = "--cpu-tdp-watts" if tdp_watts is not None else \
            f"default {DEFAULT_WATTS_PER_CPU:g} W x {self.cpus} logical CPUs"
        self.tdp_watts = float(tdp_watts) if tdp_watts is not None else DEFAULT_WATTS_PER_CPU * self.cpus
        if not self.tdp_watts > 0:
            raise ValueError("tdp_watts must be > 0")
        self.devices = [DEVICE]

    def _read(self) -> dict[str, float]:
        """The model's cumulative joules: TDP x (CPU seconds of all this process's threads) / CPUs."""
        return {DEVICE: self.tdp_watts * time.process_time() / self.cpus}

    def _labels(self) -> list[str]:
        return [f"estimate: {self.tdp_watts:g} W TDP ({self.tdp_source}) x process CPU utilisation, "
                "not a measurement"]

    def _flags(self, joules: dict[str, float], seconds: float) -> list[str]:
        if joules[DEVICE] > 0:
            return []
        return [f"{DEVICE}: the process used no CPU time in the window (zero-joule estimate)"]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "tdp_watts": self.tdp_watts, "tdp_source": self.tdp_source,
                "logical_cpus": self.cpus}
