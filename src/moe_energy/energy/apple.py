"""Apple silicon energy through Zeus's SoC layer (``zeus.device.soc.apple``, needing zeus-apple-silicon).

The SoC reports cumulative mJ per subsystem (CPU, GPU, DRAM, Neural Engine); the window's energy is each
one's difference. Optional extra ``moe-energy[apple]``; not exercised in CI (no Mac runners).
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from ..errors import Unavailable, described
from .meter import CounterMeter
from .trace import DEFAULT_PERIOD_S

# AppleSiliconMeasurement field -> our device name
FIELDS = {"cpu_total_mj": "cpu:soc", "gpu_mj": "gpu:soc", "dram_mj": "dram:soc", "ane_mj": "ane:soc"}


class AppleUnavailable(Unavailable):
    """Apple's SoC counters cannot be read here: not an Apple silicon Mac, zeus-apple-silicon missing, or its
    monitor fails to start or to read (kind "absent", "zeus missing", "no permission", "unreadable")."""


def open_soc() -> Any:
    """Zeus's Apple SoC monitor, or AppleUnavailable labelled with the cause.

    zeus-apple-silicon needs no root: IOReport's "Energy Model" channels are open to every user, so a monitor
    that fails to start (zeus wraps the extension's RuntimeError, e.g. "Failed to create IOReport subscription",
    in ZeusSoCInitError; a macOS VM or a sandbox has no such channels) is "unreadable", not "no permission";
    only an OS permission error is that."""
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
    except PermissionError as e:
        raise AppleUnavailable(f"apple: no permission to open the energy monitor ({e})",
                               kind="no permission") from None
    except Exception as e:  # ZeusSoCInitError and anything else the monitor raises while starting
        raise AppleUnavailable(f"apple: cannot open the energy monitor ({described(e, 200)})",
                               kind="unreadable") from None


class AppleMeter(CounterMeter):
    """The SoC's per-subsystem counters, read at the window's edges; the trace is their deltas."""

    name = "apple"
    method = "counter"

    def __init__(self, trace_period_s: float = DEFAULT_PERIOD_S, soc: Any | None = None) -> None:
        super().__init__(trace_period_s)
        self.soc = soc if soc is not None else open_soc()
        try:  # one reading proves the monitor works, so that auto falls back now rather than fail a window
            first = self._read()
        except Exception as e:  # e.g. a zeus-apple-silicon whose metrics lack a field zeus's SoC layer reads
            raise AppleUnavailable(f"apple: the energy monitor started but cannot be read ({described(e, 200)})",
                                   kind="unreadable") from None
        if not first:
            raise AppleUnavailable("apple: the energy monitor reads no SoC energy channel (IOReport's sample "
                                   "held none of CPU, GPU, DRAM, ANE)", kind="unreadable")
        self.devices = sorted(first)

    def _read(self) -> dict[str, float]:
        """Cumulative J per subsystem the chip reports."""
        m = self.soc.get_total_energy_consumption()
        return {dev: getattr(m, f) / 1000.0 for f, dev in FIELDS.items() if getattr(m, f, None) is not None}

    def _flags(self, joules: dict[str, float], seconds: float) -> list[str]:
        if sum(joules.values()) > 0:  # one idle subsystem (the Neural Engine, say) may rightly read 0
            return []
        return ["apple: no SoC counter advanced (zero-joule reading)"]

    def _versions(self) -> dict[str, Any]:
        from .gpu import zeus_version

        return {"zeus": zeus_version(), "macos": platform.mac_ver()[0]}
