"""The window's figures: inferences/J never inf or from a zero, flags for short windows, repeat statistics."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from moe_energy.energy import IdlePower, Measurement, NullMeter
from moe_energy.measure import window as window_mod
from moe_energy.measure.records import summarize, window_record
from moe_energy.measure.window import BenchResult, measure


class ConstantPowerMeter:
    """Joules = watts x window seconds: a counter whose answer the test knows."""

    name, method = "fake", "counter"

    def __init__(self, watts: float) -> None:
        self.watts = watts
        self.devices = ["gpu:0"]

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self) -> Measurement:
        s = time.perf_counter() - self._t0
        return Measurement(seconds=s, method="counter", meter="fake", joules_by_device={"gpu:0": self.watts * s},
                           devices_covered=["gpu:0"])


def result(joules: float | None, batches: int = 10, seconds: float = 2.0, idle_w: float | None = None):
    m = Measurement(seconds=seconds, method="counter", meter="fake",
                    joules_by_device=None if joules is None else {"gpu:0": joules}, devices_covered=["gpu:0"])
    idle = IdlePower(1.0, "counter", {"gpu:0": idle_w}) if idle_w is not None else None
    return BenchResult(4, batches, seconds, 100, [1.0, 2.0, 3.0], m, [], idle)


def test_inferences_per_joule_never_inf_never_from_zero():
    assert window_record(result(20.0))["inferences_per_joule"] == pytest.approx(40 / 20.0)
    for j in (0.0, -1.0):
        met = window_record(result(j))
        assert met["inferences_per_joule"] is None and "zero" in met["inferences_per_joule_reason"]
    met = window_record(result(None))
    assert met["inferences_per_joule"] is None and met["inferences_per_joule_reason"] == "energy not measured"


def test_dynamic_energy_subtracts_idle_power():
    met = window_record(result(20.0, seconds=2.0, idle_w=4.0))
    assert met["dynamic_energy_j"] == pytest.approx(12.0)
    assert met["dynamic_inferences_per_joule"] == pytest.approx(40 / 12.0)
    assert met["dynamic_average_power_w"] == pytest.approx(6.0)
    met = window_record(result(20.0, seconds=2.0, idle_w=12.0))  # idle above the window: no dynamic inferences/J
    assert met["dynamic_energy_j"] == pytest.approx(-4.0) and met["dynamic_inferences_per_joule"] is None
    assert any("dynamic energy <= 0" in f for f in met["flags"])
    met = window_record(result(20.0))
    assert met["dynamic_energy_j"] is None and "idle power not measured" in met["dynamic_inferences_per_joule_reason"]


def test_short_window_is_flagged_and_energy_counts(monkeypatch):
    # the latency pass after a 0.1 s window has 0.01 s, and up to 0.02 s for its least count of 10 forwards: one
    # preemption of 20 ms on a loaded host ends it with fewer. The count is what is checked here (the clock's
    # share is test_timing's, on a fake clock): give the pass all the time it needs to reach its least count
    monkeypatch.setattr(window_mod, "LATENCY_STRETCH", 1e6)
    model = nn.Linear(8, 2)
    res = measure(model, torch.zeros(16, 8), 0.1, ConstantPowerMeter(50.0), 32, warmup=0)
    assert any("shorter than 1 s" in f for f in res.flags)
    assert res.energy.joules == pytest.approx(50.0 * res.energy.seconds)
    assert res.batches > 0 and res.inferences == res.batches * 16
    assert len(res.latency_ms) >= 10


class SlowEndMeter(ConstantPowerMeter):
    """Reads its counter, then spends time closing the window, as a real meter does (the trace thread joined, the
    device's state read): that time is no part of the energy window."""

    def end(self) -> Measurement:
        m = super().end()
        time.sleep(0.05)
        return m


def test_throughput_and_power_come_from_the_same_seconds():
    # inferences/J must equal inferences/s / W, and dynamic W must equal W - idle W: one window, one clock
    res = measure(nn.Linear(8, 2), torch.zeros(16, 8), 0.1, SlowEndMeter(50.0), 32, warmup=0,
                  idle=IdlePower(1.0, "counter", {"gpu:0": 10.0}))
    met = window_record(res)
    assert met["window_s"] == res.energy.seconds
    assert met["inferences_per_second"] / met["average_power_w"] == pytest.approx(met["inferences_per_joule"])
    assert met["dynamic_average_power_w"] == pytest.approx(met["average_power_w"] - 10.0)


def test_null_meter_window_reports_not_measured():
    res = measure(nn.Linear(8, 2), torch.zeros(4, 8), 0.05, NullMeter(), 32, warmup=0)
    met = window_record(res)
    assert met["energy_j"] is None and met["inferences_per_joule"] is None and met["average_power_w"] is None


def test_summarize_medians_and_spread():
    wins = [window_record(result(j, batches=b)) for j, b in ((10.0, 10), (20.0, 30), (40.0, 20))]
    s = summarize(wins)
    assert s["repeats"] == 3 and s["windows"] == wins
    assert s["energy_j"] == 20.0 and s["energy_j_min"] == 10.0 and s["energy_j_max"] == 40.0
    ipj = sorted(w["inferences_per_joule"] for w in wins)  # 4.0, 6.0, 2.0
    assert s["inferences_per_joule"] == ipj[1]
    assert (s["inferences_per_joule_min"], s["inferences_per_joule_max"]) == (ipj[0], ipj[-1])
    assert s["inferences_per_second"] == 20 * 4 / 2.0
    assert s["energy_method"] == "counter" and s["energy_is_estimate"] is False


def test_summarize_with_unmeasured_windows():
    s = summarize([window_record(result(0.0)), window_record(result(0.0))])
    assert s["inferences_per_joule"] is None and s["inferences_per_joule_min"] is None
    assert "zero" in s["inferences_per_joule_reason"]
    s = summarize([window_record(result(0.0)), window_record(result(10.0))])
    assert s["inferences_per_joule"] == pytest.approx(4.0)
    assert "inferences_per_joule: 1 of 2 windows had energy <= 0 (the counter did not advance); the median of the " \
        "other 1" in s["flags"]
