"""Which meter to use: ``make_meter`` for an explicit ``--meter``, ``auto_meter`` for every real counter
that covers the devices in use, ``survey`` for ``moe-energy meters``.

Auto picks real counters only (GPU counter for a GPU run, RAPL when readable, Apple's SoC counters on a
Mac), reported per device and summed; the labelled estimate only when nothing real exists, with a notice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, Unavailable  # Unavailable: still importable from here, as before
from .apple import AppleMeter
from .estimate import EstimateMeter, check_tdp_watts
from .gpu import GpuMeter
from .meter import CompositeMeter, Meter, NullMeter
from .rapl import RaplMeter
from .trace import DEFAULT_PERIOD_S

METER_NAMES = ("auto", "nvidia", "amd", "rapl", "apple", "estimate", "none")


def _device_type_index(device: Any) -> tuple[str, int | None]:
    """('cuda', 0) from a torch.device or a string like 'cuda:0'; None picks the best visible device."""
    if device is None:
        import torch

        if torch.cuda.is_available():
            return "cuda", torch.cuda.current_device()
        if torch.backends.mps.is_available():
            return "mps", None
        return "cpu", None
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    index = None if isinstance(device, str) else getattr(device, "index", None)  # a str's .index is a method
    if index is None and ":" in str(device):
        index = int(str(device).split(":")[1])
    if kind == "cuda" and index is None:
        try:
            import torch

            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        except Exception:
            index = 0
    return kind, index


def _gpu_vendor() -> str:
    """ROCm builds of torch drive AMD GPUs through the 'cuda' device type."""
    try:
        import torch

        return "amd" if getattr(torch.version, "hip", None) else "nvidia"
    except ImportError:
        return "nvidia"


def _build(name: str, device: Any, cpu_tdp_watts: float | None, trace_period_s: float) -> Meter:
    """One named meter, or an Unavailable exception saying why not."""
    kind, index = _device_type_index(device)
    if name in ("nvidia", "amd"):
        return GpuMeter(name, index or 0, trace_period_s)
    if name == "rapl":
        return RaplMeter(trace_period_s=trace_period_s)
    if name == "apple":
        return AppleMeter(trace_period_s)
    if name == "estimate":
        return EstimateMeter(cpu_tdp_watts, trace_period_s=trace_period_s)
    if name == "none":
        return NullMeter("--meter none")
    raise ValueError(f"unknown meter {name!r}")


def make_meter(name: str, device: Any, cpu_tdp_watts: float | None = None,
               trace_period_s: float = DEFAULT_PERIOD_S) -> Meter:
    """The meter ``--meter NAME`` asks for; a meter that cannot work here is the user's error to fix."""
    if name not in METER_NAMES:
        raise ConfigError(f"--meter {name!r} is unknown; choose one of {', '.join(METER_NAMES)}")
    if cpu_tdp_watts is not None:
        check_tdp_watts(cpu_tdp_watts)
    if name == "auto":
        return auto_meter(device, cpu_tdp_watts=cpu_tdp_watts, trace_period_s=trace_period_s)
    try:
        return _build(name, device, cpu_tdp_watts, trace_period_s)
    except Unavailable as e:
        raise ConfigError(f"--meter {name}: {e}; run 'moe-energy meters' to see what works here") from None


def auto_meter(device: Any = None, cpu_tdp_watts: float | None = None,
               notice: Callable[[str], None] | None = None, trace_period_s: float = DEFAULT_PERIOD_S) -> Meter:
    """Every real counter covering ``device``'s run, summed; the labelled estimate only if none exists.

    A one-line notice (also kept as ``meter.notice``) says when coverage is partial or estimated.
    """
    kind, _ = _device_type_index(device)
    wanted: list[str] = []
    if kind == "cuda":
        wanted.append(_gpu_vendor())
    if kind == "mps" or (kind == "cpu" and _is_mac()):
        wanted.append("apple")
    else:
        wanted.append("rapl")
    real: list[Meter] = []
    missing: list[str] = []
    for name in wanted:
        try:
            real.append(_build(name, device, cpu_tdp_watts, trace_period_s))
        except Unavailable as e:
            missing.append(str(e))
    msg: str | None = None
    meter: Meter
    if not real:
        est = EstimateMeter(cpu_tdp_watts, trace_period_s=trace_period_s)
        meter = est
        msg = (f"no usable energy counter here ({'; '.join(missing)}): using a labelled ESTIMATE, "
               f"{est.tdp_watts:g} W TDP x process CPU utilisation")
    else:
        meter = real[0] if len(real) == 1 else CompositeMeter(real)
        if missing:
            msg = f"energy covers {', '.join(getattr(meter, 'devices', []))} only; not measured: {'; '.join(missing)}"
    meter.notice = msg  # type: ignore[attr-defined]
    if msg and notice is not None:
        notice(msg)
    return meter


def _is_mac() -> bool:
    import sys

    return sys.platform == "darwin"


@dataclass
class MeterStatus:
    name: str
    available: bool
    method: str | None = None
    devices: list[str] = field(default_factory=list)
    reason: str = ""
    # "absent" | "no driver" | "no permission" | "zeus missing" | "unreadable" | "unusable" (a lying tree) | ""
    kind: str = ""


def survey(device: Any = "cpu", cpu_tdp_watts: float | None = None) -> list[MeterStatus]:
    """Try each meter once: available or not, and why not."""
    out: list[MeterStatus] = []
    for name in ("nvidia", "amd", "rapl", "apple", "estimate", "none"):
        try:
            m = _build(name, device, cpu_tdp_watts, DEFAULT_PERIOD_S)
        except Unavailable as e:
            out.append(MeterStatus(name, False, reason=str(e), kind=e.kind))
            continue
        reason = {"estimate": "always works: a labelled model (CPU TDP x process CPU utilisation), "
                              "not a measurement",
                  "none": "times windows only; no energy"}.get(name, "")
        out.append(MeterStatus(name, True, m.method, list(getattr(m, "devices", [])), reason))
    return out
