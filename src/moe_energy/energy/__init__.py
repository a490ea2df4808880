"""Energy meters: each reads one kind of counter over a begin/end window and returns a Measurement.

Hardware libraries (zeus, pynvml, amdsmi) are imported only when their meter is built.
"""

from .estimate import EstimateMeter
from .idle import IdlePower, dynamic_joules, measure_idle
from .meter import CompositeMeter, ImpossibleReading, Measurement, Meter, NullMeter, meter_info, window
from .rapl import RaplMeter, RaplUnavailable
from .select import METER_NAMES, MeterStatus, auto_meter, make_meter, survey

__all__ = [
    "METER_NAMES", "CompositeMeter", "EstimateMeter", "IdlePower", "ImpossibleReading", "Measurement", "Meter",
    "MeterStatus", "NullMeter", "RaplMeter", "RaplUnavailable", "auto_meter", "dynamic_joules", "make_meter",
    "measure_idle", "meter_info", "survey", "window",
]
