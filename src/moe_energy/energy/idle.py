"""Idle power: the metered devices' draw with nothing running, so the windows' energy can be split into
raw (what the counter says) and dynamic (raw minus idle power x window seconds: what the model added)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .contention import CpuShare
from .meter import Measurement, Meter, window


@dataclass
class IdlePower:
    seconds: float
    method: str
    power_by_device_w: dict[str, float] | None
    flags: list[str] = field(default_factory=list)

    @property
    def power_w(self) -> float | None:
        if self.power_by_device_w is None:
            return None
        return float(sum(self.power_by_device_w.values()))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "power_w": self.power_w}


def measure_idle(meter: Meter, seconds: float, sync: Callable[[], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> IdlePower | None:
    """Read ``meter`` over ``seconds`` of sleep; None when skipped (``seconds`` <= 0)."""
    if seconds <= 0:
        return None
    cpu = CpuShare()
    cpu.begin()
    with window(meter, "idle", sync) as w:
        sleep(seconds)
    m = w.result
    assert m is not None
    use = cpu.end(m.seconds)
    power = None
    if m.joules_by_device is not None and m.seconds > 0:
        power = {d: j / m.seconds for d, j in m.joules_by_device.items()}
    crowded = use.flag("the idle reading") if use is not None else None
    return IdlePower(seconds=m.seconds, method=m.method, power_by_device_w=power,
                     flags=list(m.flags) + ([crowded] if crowded else []))


def dynamic_joules(m: Measurement, idle: IdlePower | None) -> dict[str, float] | None:
    """Per device: raw joules minus idle power x the seconds it measured; None without an idle reading."""
    if idle is None or idle.power_by_device_w is None or m.joules_by_device is None:
        return None
    return {d: j - idle.power_by_device_w.get(d, 0.0) * m.seconds_of(d) for d, j in m.joules_by_device.items()}
