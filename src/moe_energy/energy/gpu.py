"""NVIDIA and AMD GPU energy through Zeus's device layer (``zeus.device.gpu``; NVML / amdsmi beneath).

Volta and newer NVIDIA GPUs (and AMD GPUs whose amdsmi exposes it) keep a cumulative energy counter
(mJ): the window's energy is the counter's difference, read right after the caller's device sync.
Older GPUs have no counter: their energy integrates the sampled power trace (method ``sampled``).

We poll power ourselves at an explicit period (``trace_period_s``) instead of using Zeus's
``ZeusMonitor``/``PowerMonitor``: ZeusMonitor builds its PowerMonitor with ``update_period=None``, whose
inferred polling period misbehaves in Zeus 0.16. Zeus is imported lazily, so the core runs without it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import Unavailable
from .meter import Ceilings, CounterMeter, integrate
from .trace import DEFAULT_PERIOD_S, PowerTrace

VENDORS = ("nvidia", "amd")
# A window's average power above this many times the GPU's enforced power limit is no GPU: boards hold
# their average at the limit, and transients above it last milliseconds, not a window of 0.1 s or more.
POWER_LIMIT_MARGIN = 1.5
# Where the power limit cannot be read: above the largest single accelerators (B200 / MI355X at 1000-1400 W).
GPU_MAX_W = 3000.0
# How old an energy counter reading can be: drivers refresh power and energy about every 100 ms or faster.
GPU_STALE_S = 0.1


class GpuUnavailable(Unavailable):
    """This GPU meter cannot work here; one line saying why (no driver, no permission, absent, no zeus)."""


def zeus_version() -> str | None:
    try:
        import zeus
    except ImportError:
        return None
    return getattr(zeus, "__version__", "unknown")


def open_gpus(vendor: str) -> Any:
    """A fresh Zeus ``GPUs`` object for ``vendor`` (not Zeus's process-wide singleton, so tests can fake
    NVML); raises GpuUnavailable with the reason."""
    if vendor not in VENDORS:
        raise ValueError(f"unknown GPU vendor {vendor!r}")
    try:
        import zeus  # noqa: F401
    except ImportError:
        raise GpuUnavailable("zeus is not installed; pip install 'moe-energy[gpu]'", kind="zeus missing") from None
    try:
        from zeus.device.gpu import common
        if vendor == "nvidia":
            from zeus.device.gpu.nvidia import NVIDIAGPUs as GPUs
        else:
            from zeus.device.gpu.amd import AMDGPUs as GPUs
            from zeus.device.gpu.amd import amdsmi_is_available

            if not amdsmi_is_available():
                raise GpuUnavailable("amd: amdsmi could not initialise (no ROCm driver or no AMD GPU)",
                                     kind="no driver")
    except ImportError as e:
        raise GpuUnavailable(f"{vendor}: zeus cannot load its {vendor} backend ({e})", kind="no driver") from None
    try:
        gpus = GPUs()
    except (common.ZeusGPULibraryNotFoundError, common.ZeusGPUDriverNotLoadedError) as e:
        raise GpuUnavailable(f"{vendor}: no driver ({e})", kind="no driver") from None
    except common.ZeusGPUNoPermissionError as e:
        raise GpuUnavailable(f"{vendor}: no permission to query the GPU ({e})", kind="no permission") from None
    except Exception as e:  # any other init failure, reported rather than crashing a survey
        raise GpuUnavailable(f"{vendor}: cannot initialise ({type(e).__name__}: {e})", kind="no driver") from None
    if len(gpus) == 0:
        raise GpuUnavailable(f"{vendor}: the driver sees no GPU", kind="absent")
    return gpus


class GpuMeter(CounterMeter):
    """One GPU's energy counter (or sampled power) through Zeus; a ~10 Hz power trace alongside."""

    stale_s = GPU_STALE_S

    def __init__(self, vendor: str = "nvidia", index: int = 0, trace_period_s: float = DEFAULT_PERIOD_S,
                 gpus: Any | None = None) -> None:
        super().__init__(trace_period_s)
        self.vendor, self.index, self.name = vendor, index, vendor
        self.gpus = gpus if gpus is not None else open_gpus(vendor)
        if not 0 <= index < len(self.gpus):
            raise GpuUnavailable(f"{vendor}: GPU index {index} not visible ({len(self.gpus)} GPU(s))",
                                 kind="absent")
        try:
            self.has_counter = bool(self.gpus.supports_get_total_energy_consumption(index))
        except Exception as e:  # the driver refused the query: reported, as open_gpus reports a failed init
            raise GpuUnavailable(f"{vendor}: cannot ask GPU {index} for an energy counter ({type(e).__name__}: {e})",
                                 kind="unreadable") from None
        self.method = "counter" if self.has_counter else "sampled"
        self.device = f"gpu:{index}"
        self.devices = [self.device]
        self._instant = True

    def _read(self) -> dict[str, float]:
        """The counter in mJ, as the driver gives it; a GPU without one is never asked."""
        if not self.has_counter:
            return {}
        return {self.device: self.gpus.get_total_energy_consumption(self.index)}

    def _delta(self, begin: dict[str, float], end: dict[str, float], seconds: float,
               trace: dict[str, list[list[float]]]) -> dict[str, float]:
        """The counter's difference; without a counter, the sampled power integrated over the window."""
        if self.has_counter:
            return {self.device: (end[self.device] - begin[self.device]) / 1000.0}
        return {self.device: integrate(trace.get(self.device, []), seconds)}

    def _sampler(self) -> PowerTrace:
        """The GPU has a power sensor: the trace samples it, never the counter."""
        return PowerTrace(power=self._power, period_s=self.trace_period_s)

    def _flags(self, joules: dict[str, float], seconds: float) -> list[str]:
        flags: list[str] = []
        if not self.has_counter and not self._instant:  # with a counter the trace is only evidence
            flags.append(f"{self.device}: sampled energy integrates the driver's averaged power (instant power "
                         "refused), which trails the real draw by up to its ~1 s averaging: the window's energy "
                         "is shifted late")
        if joules[self.device] <= 0:
            flags.append(f"{self.device}: energy {'counter did not advance' if self.has_counter else 'trace is empty'}"
                         " (zero-joule reading)")
        return flags

    def _ceilings(self, state_end: dict[str, dict[str, Any]]) -> Ceilings:
        """POWER_LIMIT_MARGIN x the larger power limit of the window's edges, else GPU_MAX_W."""
        limits = [s.get(self.device, {}).get("power_limit_w") for s in (self._state0, state_end)]
        known = [w for w in limits if isinstance(w, (int, float)) and w > 0]
        if not known:
            return {self.device: (GPU_MAX_W, "physical ceiling of a GPU; its power limit is unreadable")}
        limit = max(known)
        return {self.device: (POWER_LIMIT_MARGIN * limit, f"{POWER_LIMIT_MARGIN:g} x its {limit:g} W power limit")}

    def _power(self) -> dict[str, float]:
        if self._instant:
            try:
                return {self.device: self.gpus.get_instant_power_usage(self.index) / 1000.0}
            except Exception:  # some AMD GPUs expose only the averaged power
                self._instant = False
        return {self.device: self.gpus.get_average_power_usage(self.index) / 1000.0}

    def _state(self) -> dict[str, dict[str, Any]]:
        return {self.device: self.state()}

    def state(self) -> dict[str, Any]:
        """Temperature, SM clock and power limit now; a reading the GPU refuses is None."""
        out: dict[str, Any] = {"temperature_c": None, "sm_clock_mhz": None, "power_limit_w": None}
        with contextlib.suppress(Exception):
            out["temperature_c"] = self.gpus.get_gpu_temperature(self.index)
        with contextlib.suppress(Exception):
            out["power_limit_w"] = self.gpus.get_power_management_limit(self.index) / 1000.0
        if self.vendor == "nvidia":  # Zeus has no clock getter; NVML's is one call on Zeus's handle
            with contextlib.suppress(Exception):
                import pynvml

                handle = self.gpus.gpus[self.index].handle
                out["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        return out

    def _versions(self) -> dict[str, Any]:
        versions: dict[str, Any] = {"zeus": zeus_version()}
        with contextlib.suppress(Exception):
            versions["gpu_name"] = self.gpus.get_name(self.index)
        if self.vendor == "nvidia":
            with contextlib.suppress(Exception):
                import pynvml

                drv = pynvml.nvmlSystemGetDriverVersion()
                versions["nvidia_driver"] = drv.decode() if isinstance(drv, bytes) else drv
                nv = pynvml.nvmlSystemGetNVMLVersion()
                versions["nvml"] = nv.decode() if isinstance(nv, bytes) else nv
        return versions
