"""Measurement arithmetic, the composite meter, power traces, idle power and the labelled estimate."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from moe_energy.energy import (
    CompositeMeter,
    EstimateMeter,
    Measurement,
    NullMeter,
    dynamic_joules,
    make_meter,
    measure_idle,
    select,
)
from moe_energy.energy.apple import AppleUnavailable
from moe_energy.energy.estimate import DEFAULT_WATTS_PER_CPU
from moe_energy.energy.gpu import GpuUnavailable
from moe_energy.energy.meter import CounterMeter, integrate, weakest
from moe_energy.energy.rapl import RaplUnavailable
from moe_energy.energy.trace import PowerTrace
from moe_energy.errors import ConfigError, Unavailable


class ScriptedMeter:
    """A meter whose joules per window are given; devices named by the test."""

    def __init__(self, name: str, joules: dict[str, float], method: str = "counter") -> None:
        self.name, self.method, self.joules = name, method, joules
        self.devices = list(joules)
        self.calls: list[str] = []

    def begin(self) -> None:
        self.calls.append("begin")
        self._t0 = time.perf_counter()

    def end(self) -> Measurement:
        self.calls.append("end")
        return Measurement(seconds=time.perf_counter() - self._t0, method=self.method, meter=self.name,
                           joules_by_device=dict(self.joules), devices_covered=list(self.devices))


def test_integrate_holds_the_ends_flat():
    assert integrate([[0.5, 10.0]], 2.0) == pytest.approx(20.0)
    assert integrate([[0.0, 0.0], [1.0, 10.0]], 1.0) == pytest.approx(5.0)
    assert integrate([[0.25, 4.0], [0.75, 8.0]], 1.0) == pytest.approx(0.25 * 4 + 0.5 * 6 + 0.25 * 8)


def test_cross_check_flags_a_trace_over_five_percent_off():
    m = Measurement(seconds=1.0, method="counter", meter="x", joules_by_device={"gpu:0": 100.0},
                    trace={"gpu:0": [[0.0, 104.0], [1.0, 104.0]]})
    m.cross_check()
    assert m.flags == []
    m.trace = {"gpu:0": [[0.0, 110.0], [1.0, 110.0]]}
    m.cross_check()
    assert len(m.flags) == 1 and "+10%" in m.flags[0]


def test_composite_reports_each_device_and_sums():
    a = ScriptedMeter("nvidia", {"gpu:0": 30.0})
    b = ScriptedMeter("rapl", {"cpu:package-0": 12.0, "dram:package-0": 3.0})
    c = CompositeMeter([a, b])
    assert c.name == "nvidia+rapl" and c.devices == ["gpu:0", "cpu:package-0", "dram:package-0"]
    c.begin()
    m = c.end()
    assert a.calls == b.calls == ["begin", "end"]
    assert m.joules_by_device == {"gpu:0": 30.0, "cpu:package-0": 12.0, "dram:package-0": 3.0}
    assert m.joules == 45.0 and m.method == "counter"
    assert m.method_by_device == {"gpu:0": "counter", "cpu:package-0": "counter", "dram:package-0": "counter"}


def test_weakest_method_wins():
    assert weakest(["counter", "sampled"]) == "sampled"
    assert weakest(["counter", "estimate"]) == "estimate"
    assert weakest([]) == "none"


def test_power_trace_from_an_energy_counter():
    t0 = time.perf_counter()
    tr = PowerTrace(energy=lambda: {"cpu": 25.0 * (time.perf_counter() - t0)}, period_s=0.02)
    tr.start()
    time.sleep(0.3)
    pts = tr.stop()["cpu"]
    assert len(pts) >= 5
    assert all(w == pytest.approx(25.0, rel=0.05) for _, w in pts)
    assert [t for t, _ in pts] == sorted(t for t, _ in pts)


def test_power_trace_survives_a_failing_sensor():
    def broken() -> dict[str, float]:
        raise OSError("sensor gone")

    tr = PowerTrace(power=broken, period_s=0.01)
    tr.start()
    time.sleep(0.05)
    assert tr.stop() == {}
    assert tr.errors and "sensor gone" in tr.errors[0]


def test_estimate_is_tdp_times_process_cpu_share_and_labelled():
    meter = EstimateMeter(tdp_watts=20.0, cpus=2)
    c0 = time.process_time()
    meter.begin()
    x = 0
    while time.process_time() - c0 < 0.3:  # busy: burn CPU time
        x += 1
    m = meter.end()
    cpu_s = time.process_time() - c0
    assert m.method == "estimate" and m.meter == "estimate" and m.is_estimate
    assert m.joules == pytest.approx(20.0 / 2 * cpu_s, rel=0.05)
    assert any(f.startswith("estimate:") for f in m.flags)
    assert m.as_dict()["method"] == "estimate"


def test_estimate_default_tdp_is_documented_per_cpu():
    m = EstimateMeter(cpus=4)
    assert m.tdp_watts == DEFAULT_WATTS_PER_CPU * 4
    assert "default" in m.info()["tdp_source"]


def test_idle_power_and_dynamic_energy():
    idle_meter = ScriptedMeter("x", {"gpu:0": 1.0})  # 1 J over ~0.05 s of idle

    idle = measure_idle(idle_meter, 0.05)
    assert idle is not None and idle.power_by_device_w["gpu:0"] == pytest.approx(1.0 / idle.seconds)
    m = Measurement(seconds=2.0, method="counter", meter="x", joules_by_device={"gpu:0": 100.0})
    dyn = dynamic_joules(m, idle)
    assert dyn == {"gpu:0": pytest.approx(100.0 - idle.power_by_device_w["gpu:0"] * 2.0)}
    assert measure_idle(idle_meter, 0) is None
    assert dynamic_joules(m, None) is None


def test_null_meter_measures_nothing():
    meter = NullMeter("because")
    meter.begin()
    m = meter.end()
    assert m.joules is None and m.average_power_w is None
    assert m.flags == ["not measured: because"]


def test_make_meter_errors_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_ENERGY_POWERCAP_ROOT", str(tmp_path / "absent"))
    with pytest.raises(ConfigError) as e:
        make_meter("rapl", torch.device("cpu"))
    assert "\n" not in str(e.value) and "moe-energy meters" in str(e.value)
    with pytest.raises(ConfigError):
        make_meter("bogus", torch.device("cpu"))
    with pytest.raises(ConfigError):
        make_meter("estimate", torch.device("cpu"), cpu_tdp_watts=-5)
    assert make_meter("estimate", torch.device("cpu"), cpu_tdp_watts=35).tdp_watts == 35


class FakeCounter(CounterMeter):
    """A new meter written the intended way: it says only how to read its counter (cumulative J)."""

    name = "fake"
    method = "counter"
    devices = ["fake:0"]

    def __init__(self, watts: float, trace_period_s: float = 0.02) -> None:
        super().__init__(trace_period_s)
        self.watts, self.extra_j, self.start = watts, 0.0, time.perf_counter()

    def _read(self) -> dict[str, float]:
        return {"fake:0": self.watts * (time.perf_counter() - self.start) + self.extra_j}


def trace_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moe-energy-power-trace"]


def test_a_meter_with_only_its_counter_gets_the_whole_window():
    meter = FakeCounter(watts=40.0)
    meter.begin()
    assert len(trace_threads()) == 1  # the base started the sampler
    time.sleep(0.3)
    m = meter.end()
    assert not trace_threads() and meter._trace is None and meter._t0 is None
    assert 0.3 <= m.seconds < 1.0
    assert m.joules_by_device == {"fake:0": pytest.approx(40.0 * m.seconds, rel=0.01)}
    assert (m.method, m.meter, m.devices_covered) == ("counter", "fake", ["fake:0"])
    assert m.method_by_device == {"fake:0": "counter"} and m.flags == []
    assert m.state_begin == {} and m.state_end == {}
    # the trace is the counter's own deltas: about 40 W, integrating to the counter's joules
    pts = m.trace["fake:0"]
    assert len(pts) >= 5 and m.trace_period_s == 0.02
    assert all(w == pytest.approx(40.0, rel=0.05) for _, w in pts)
    assert m.trace_energy_j()["fake:0"] == pytest.approx(m.joules, rel=0.05)
    assert meter.info() == {"name": "fake", "method": "counter", "devices": ["fake:0"], "versions": {}}
    with pytest.raises(RuntimeError, match="before begin"):
        meter.end()


def test_counter_meter_flags_a_counter_that_did_not_advance_and_traces_a_step():
    meter = FakeCounter(watts=0.0)
    meter.begin()
    m = meter.end()
    assert m.joules_by_device == {"fake:0": 0.0}
    assert m.flags == ["fake:0: fake counter did not advance (zero-joule reading)"]

    meter = FakeCounter(watts=0.0, trace_period_s=10.0)  # no sample between the edges
    meter.begin()
    meter.extra_j = 15.0  # a step the end edge sees; the trace's one point spreads it over the window
    time.sleep(0.3)
    m = meter.end()
    assert m.joules_by_device == {"fake:0": 15.0}
    [(t, w)] = m.trace["fake:0"]
    assert t == pytest.approx(m.seconds / 2, rel=0.1) and w == pytest.approx(15.0 / m.seconds, rel=0.1)


def test_counter_meter_abort_stops_the_sampler_and_the_meter_works_again():
    meter = FakeCounter(watts=10.0)
    meter.begin()
    meter.abort()
    assert not trace_threads() and meter._trace is None and meter._t0 is None
    with pytest.raises(RuntimeError):
        meter.end()
    with meter.window(sync=lambda: None) as w:
        time.sleep(0.05)
    assert w.result is not None and w.result.joules == pytest.approx(10.0 * w.result.seconds, rel=0.01)


def test_every_meter_unavailable_is_the_one_base():
    for cls in (RaplUnavailable, GpuUnavailable, AppleUnavailable):
        assert issubclass(cls, Unavailable)
        e = cls("why", kind="no permission")
        assert str(e) == "why" and e.kind == "no permission" and cls("x").kind == "absent"
    assert select.Unavailable is Unavailable


class FakeGpus:
    """Zeus's ``GPUs`` object for one GPU, with or without an energy counter (all GpuMeter asks at start)."""

    def __init__(self, counter: bool) -> None:
        self.counter = counter

    def __len__(self) -> int:
        return 1

    def supports_get_total_energy_consumption(self, index: int) -> bool:
        return self.counter


def readme_meter_methods() -> dict[str, set[str]]:
    """The README's 'How energy is measured' table: meter -> the methods its last column names."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("## How energy is measured", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    return {name.strip().strip("`"): set(re.findall(r"`(\w+)`", method)) for name, _, method in rows}


def test_the_readme_table_of_meters_names_every_method_each_meter_can_report(monkeypatch, tmp_path):
    from moe_energy.energy.apple import AppleMeter
    from moe_energy.energy.gpu import GpuMeter
    from moe_energy.energy.rapl import RaplMeter

    reported = {v: {GpuMeter(v, 0, gpus=FakeGpus(c)).method for c in (True, False)} for v in ("nvidia", "amd")}
    reported |= {"rapl": {RaplMeter.method}, "apple": {AppleMeter.method}, "estimate": {EstimateMeter.method},
                 "none": {NullMeter.method}}
    assert set(reported) == set(select.METER_NAMES) - {"auto"}
    assert readme_meter_methods() == reported
