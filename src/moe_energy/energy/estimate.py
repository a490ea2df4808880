"""The estimate meter, for hosts with no energy counter (VMs, most containers): a model, not a reading.

power_w = CPU TDP x the process's CPU utilisation, i.e. energy_j = TDP / logical CPUs x process CPU seconds.
TDP comes from ``--cpu-tdp-watts``, else DEFAULT_WATTS_PER_CPU x logical CPUs. Idle, uncore, DRAM and
turbo above TDP are all ignored, so the figure is only good for a rough order of magnitude: every number
from this meter carries method ``estimate`` and is labelled as such wherever it is shown.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from ..config import MAX_POWER_LIMIT_W
from ..errors import ConfigError
from .meter import CounterMeter
from .trace import DEFAULT_PERIOD_S

# 5 W per logical CPU: a desktop part (65-125 W over 12-24 threads) or a server part (200-350 W over
# 64-128 threads) lands between 2.5 and 10 W per thread; 5 W sits in the middle of that range.
DEFAULT_WATTS_PER_CPU = 5.0

DEVICE = "cpu:estimate"


def check_tdp_watts(v: object) -> None:
    """The one rule for --cpu-tdp-watts: a finite number of watts > 0 (inf would make every window's reading
    non-finite, and the run fail window after window), and no more than any device draws (config's
    MAX_POWER_LIMIT_W, the power caps' bound: 1e12 would be an estimate in terawatts, labelled as a figure)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"--cpu-tdp-watts {v!r} must be a finite number of watts > 0, e.g. 65")
    if v > MAX_POWER_LIMIT_W:
        raise ConfigError(f"--cpu-tdp-watts {v!r} W is above any CPU's power ({MAX_POWER_LIMIT_W:g} W); give the "
                          "package's TDP in watts, e.g. 65")


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
        if tdp_watts is not None:
            check_tdp_watts(tdp_watts)
        self.tdp_watts = float(tdp_watts) if tdp_watts is not None else DEFAULT_WATTS_PER_CPU * self.cpus
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
