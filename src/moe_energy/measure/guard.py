"""The run's meter behind a guard: any failure to start or read a window fails that window only, and a
reading that is not a positive, finite number of joules, or that implies a power no device draws (a
counter's ``ImpossibleReading``), is never passed on as a figure."""

from __future__ import annotations

import math

from ..energy.meter import ImpossibleReading, Measurement, Meter, abort
from ..errors import one_line


class MeterFailed(RuntimeError):
    """The meter could not start or read a window; the message says why, in one line."""


class GuardedMeter:
    """A meter whose every failure is a MeterFailed (a counter gone, permission revoked, driver error)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.meters = [meter]  # energy.meter.abort() closes the real meter through this
        self.name, self.method = meter.name, meter.method
        self.devices = list(getattr(meter, "devices", []))

    def begin(self) -> None:
        try:
            self.meter.begin()
        except Exception as e:  # noqa: BLE001 - any meter error fails this window, not the run
            abort(self.meter)
            raise MeterFailed(f"meter {self.name} could not start the window: {one_line(e)}") from None

    def end(self) -> Measurement:
        try:
            m = self.meter.end()
        except ImpossibleReading as e:
            abort(self.meter)
            raise MeterFailed(f"meter {self.name} read an impossible figure: {one_line(e)}") from None
        except Exception as e:  # noqa: BLE001
            abort(self.meter)
            raise MeterFailed(f"meter {self.name} could not read the window: {one_line(e)}") from None
        if m.joules_by_device is not None:
            values = list(m.joules_by_device.values())
            bad = [f"{d}={j!r}" for d, j in m.joules_by_device.items()
                   if not isinstance(j, (int, float)) or not math.isfinite(j) or j < 0]
            if bad or sum(values) <= 0:
                why = f"meter {self.name} read {', '.join(bad) if bad else f'{sum(values):g} J in total'}"
                raise MeterFailed(f"{why}: not a valid energy reading")
        return m
