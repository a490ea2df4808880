"""Energy meters: each reads one kind of counter over a begin/end window and returns a Measurement."""

from .meter import Measurement, Meter, NullMeter

__all__ = ["Measurement", "Meter", "NullMeter"]
