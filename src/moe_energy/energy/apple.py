"""Apple silicon energy through Zeus's SoC layer (``zeus.device.soc.apple``, needing zeus-apple-silicon).

The SoC reports cumulative mJ per subsystem (CPU, GPU, DRAM, Neural Engine); the window's energy is each
one's difference. Optional extra ``moe-energy[apple]``; not exercised in CI (no Mac runners).
"""

from __future__ import annotations

import platform
import sys
import time
from typing import Any

from .meter import Measurement, MeterBase
from .trace import DEFAULT_PERIOD_S, PowerTrace

# AppleSiliconMeasurement field -> our device name
FIELDS = {"cpu_total_mj": "cpu:soc", "gpu_mj": "gpu:soc", "dram_mj": "dram:soc", "ane_mj": "ane:soc"}


class AppleUnavailable(RuntimeError):
    def __init__(self, message: str, kind: str = "absent") -> None:
        super().__init__(message)
        self.kind = kind


def open_soc() -> Any:
    if sys.platform != "darwin" or platform.machine() != "arm64":
        raise AppleUnavailable("apple: not an Apple silicon Mac", kind="absent")
    try:
        from zeus.device.soc.apple import AppleSilicon, apple_silicon_is_available
    except ImportError:
        raise AppleUnavailable("apple: zeus is not installed; pip install 'moe-energy[apple]'",
                               kind="zeus missing") from None
    if not apple_silicon_is_available():
        raise AppleUnavailable("apple: zeus-apple-silicon is not installed; pip install 'moe-energy[apple]'",
                               kind="zeus missing")
    try:
        return AppleSilicon()
    except Exception as e:
        raise AppleUnavailable(f"apple: cannot open the energy monitor ({e})", kind="no permission") from None


class AppleMeter(MeterBase):
    name = "apple"
    method = "counter"

    def __init__(self, trace_period_s: float = DEFAULT_PERIOD_S, soc: Any | None = None) -> None:
        self.soc = soc if soc is not None else open_soc()
        first = self._read()
        self.devices = sorted(first)
        self.trace_period_s = trace_period_s
        self._trace: PowerTrace | None = None
        self._t0: float | None = None
        self._e0: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        """Cumulative J per subsystem the chip reports."""
        m = self.soc.get_total_energy_consumption()
        return {dev: getattr(m, f) / 1000.0 for f, dev in FIELDS.items() if getattr(m, f, None) is not None}

    def begin(self) -> None:
        self._trace = PowerTrace(energy=self._read, period_s=self.trace_period_s)
        self._trace.start()
        self._t0 = time.perf_counter()
        self._e0 = self._read()

    def end(self) -> Measurement:
        if self._t0 is None or self._trace is None:
            raise RuntimeError("end() called before begin()")
        e1 = self._read()
        secs = time.perf_counter() - self._t0
        trace = self._trace.stop()
        joules = {d: e1[d] - self._e0[d] for d in self.devices if d in e1 and d in self._e0}
        flags = list(self._trace.errors)
        if sum(joules.values()) <= 0:  # one idle subsystem (the Neural Engine, say) may rightly read 0
            flags.append("apple: no SoC counter advanced (zero-joule reading)")
        m = Measurement(seconds=secs, method=self.method, meter=self.name, joules_by_device=joules,
                        devices_covered=list(self.devices), flags=flags, trace=trace,
                        trace_period_s=self.trace_period_s, method_by_device={d: self.method for d in joules})
        m.cross_check()
        self._t0, self._trace = None, None
        return m

    def info(self) -> dict[str, Any]:
        from .gpu import zeus_version

        return {"name": self.name, "method": self.method, "devices": list(self.devices),
                "versions": {"zeus": zeus_version(), "macos": platform.mac_ver()[0]}}
