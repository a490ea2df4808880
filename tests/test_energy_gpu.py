"""The NVIDIA path through Zeus's real device layer, over a fake NVML: only pynvml's functions are faked."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moe_energy.measure.records import window_record

pynvml = pytest.importorskip("pynvml")
pytest.importorskip("zeus")

from moe_energy.energy import auto_meter, make_meter  # noqa: E402
from moe_energy.energy.gpu import GPU_MAX_W, POWER_LIMIT_MARGIN, GpuMeter  # noqa: E402
from moe_energy.energy.meter import CompositeMeter, ImpossibleReading, counter_traced  # noqa: E402
from moe_energy.energy.rapl import ENV_ROOT  # noqa: E402
from moe_energy.measure.guard import GuardedMeter, MeterFailed  # noqa: E402
from moe_energy.measure.window import measure  # noqa: E402


class FakeNVML:
    """One GPU whose energy counter (mJ) and power (mW) the test controls; every call logged."""

    def __init__(self, arch: int = pynvml.NVML_DEVICE_ARCH_HOPPER) -> None:
        self.arch = arch
        self.counter_mj: list[int] = []  # values returned by successive energy reads; the last one repeats
        self.power_mw = 300_000
        self.log: list[str] = []
        self.handle = object()

    def energy(self, handle) -> int:
        assert handle is self.handle
        self.log.append("energy")
        return self.counter_mj.pop(0) if len(self.counter_mj) > 1 else self.counter_mj[0]

    def field_values(self, handle, fields):
        self.log.append("power")
        return [SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, value=SimpleNamespace(uiVal=self.power_mw))
                for _ in fields]

    def install(self, monkeypatch) -> None:
        def not_supported(*a):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("ZEUSD_SOCK_PATH", raising=False)
        for name, fn in {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: 1,
            "nvmlDeviceGetHandleByIndex": lambda i: self.handle,
            "nvmlDeviceGetC2cModeInfoV": not_supported,
            "nvmlDeviceGetArchitecture": lambda h: self.arch,
            "nvmlDeviceGetTotalEnergyConsumption": self.energy,
            "nvmlDeviceGetFieldValues": self.field_values,
            "nvmlDeviceGetTemperatureV": lambda h, sensor: 55,
            "nvmlDeviceGetPowerManagementLimit": lambda h: 700_000,
            "nvmlDeviceGetClockInfo": lambda h, clock: 1980,
            "nvmlDeviceGetName": lambda h: "Fake H100",
            "nvmlSystemGetDriverVersion": lambda: "550.00",
            "nvmlSystemGetNVMLVersion": lambda: "12.550.00",
        }.items():
            monkeypatch.setattr(pynvml, name, fn)


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNVML()
    fake.install(monkeypatch)
    return fake


def test_energy_is_the_counter_difference(nvml):
    nvml.counter_mj = [5_000_000, 5_012_345]
    meter = GpuMeter("nvidia", 0)
    assert meter.method == "counter" and meter.devices == ["gpu:0"]
    meter.begin()
    time.sleep(0.25)
    m = meter.end()
    assert m.joules_by_device == {"gpu:0": pytest.approx(12.345)}
    assert m.method_by_device == {"gpu:0": "counter"}
    assert nvml.log.count("energy") == 2  # once per edge; the trace samples power, never the counter
    assert m.state_begin["gpu:0"] == {"temperature_c": 55, "sm_clock_mhz": 1980, "power_limit_w": 700.0}
    assert m.state_end["gpu:0"]["temperature_c"] == 55
    assert len(m.trace["gpu:0"]) >= 2 and all(w == 300.0 for _, w in m.trace["gpu:0"])
    info = meter.info()
    assert info["versions"]["nvidia_driver"] == "550.00" and info["versions"]["zeus"]


def test_trace_disagreeing_with_counter_is_flagged(nvml):
    nvml.power_mw = 300_000
    nvml.counter_mj = [0, 1]  # 1 mJ over ~0.3 s while the power sensor says 300 W
    meter = GpuMeter("nvidia", 0)
    meter.begin()
    time.sleep(0.3)
    m = meter.end()
    assert any("power trace integrates" in f for f in m.flags)


def test_zero_delta_is_flagged_and_withholds_inferences_per_joule(nvml):
    nvml.counter_mj = [7_000_000]  # never advances
    model = nn.Linear(4, 2)
    res = measure(model, torch.zeros(8, 4), 0.05, GpuMeter("nvidia", 0), 16, warmup=0)
    assert res.energy.joules == 0
    assert any("did not advance" in f for f in res.energy.flags)
    met = window_record(res)
    assert met["inferences_per_joule"] is None
    assert "zero" in met["inferences_per_joule_reason"]


class LoggingModel(nn.Module):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        self.log.append("model")
        return self.lin(x)


def test_syncs_happen_at_the_window_edges_only(nvml):
    nvml.counter_mj = [1_000_000, 1_050_000]
    model = LoggingModel(nvml.log)
    res = measure(model, torch.zeros(8, 4), 0.2, GpuMeter("nvidia", 0), 16, warmup=0,
                  sync=lambda: nvml.log.append("sync"))
    seq = [e for e in nvml.log if e != "power"]
    first, second = [i for i, e in enumerate(seq) if e == "energy"]
    assert seq[first - 1] == "sync"  # begin: sync, then read the counter
    assert seq[second - 1] == "sync"  # end: sync, then read the counter
    inside = seq[first + 1 : second - 1]
    assert inside and set(inside) == {"model"}, "no sync may happen inside the window"
    assert len(inside) == res.batches
    assert res.energy.joules == pytest.approx(50.0)
    assert res.inferences_per_joule == pytest.approx(res.inferences / 50.0)


def test_pre_volta_gpu_integrates_sampled_power(monkeypatch):
    fake = FakeNVML(arch=pynvml.NVML_DEVICE_ARCH_PASCAL)
    fake.install(monkeypatch)
    fake.counter_mj = [0]
    fake.power_mw = 100_000
    meter = GpuMeter("nvidia", 0, trace_period_s=0.05)
    assert meter.method == "sampled"
    meter.begin()
    time.sleep(0.5)
    m = meter.end()
    assert "energy" not in fake.log  # no counter on this GPU: never read
    assert m.method == "sampled"
    assert m.joules == pytest.approx(100.0 * m.seconds, rel=0.02)


def test_sampled_energy_from_averaged_power_says_so(monkeypatch):
    # A driver that refuses instant power leaves NVML's average (over ~1 s on Ampere and newer): integrated over a
    # window it lags the window by about half a second, so a GPU without a counter must say which power it summed.
    fake = FakeNVML(arch=pynvml.NVML_DEVICE_ARCH_PASCAL)
    fake.install(monkeypatch)
    fake.counter_mj = [0]

    def average_only(handle, fields):
        fake.log.append("power")
        return [SimpleNamespace(nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED if f == pynvml.NVML_FI_DEV_POWER_INSTANT
                                else pynvml.NVML_SUCCESS, value=SimpleNamespace(uiVal=fake.power_mw))
                for f, _ in fields]

    monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", average_only)
    meter = GpuMeter("nvidia", 0, trace_period_s=0.05)
    meter.begin()
    time.sleep(0.2)
    m = meter.end()
    assert m.method == "sampled" and m.joules == pytest.approx(300.0 * m.seconds, rel=0.05)
    assert any(f.startswith("gpu:0: sampled energy integrates the driver's averaged power") for f in m.flags), m.flags


def test_make_meter_and_auto_on_a_gpu_run(nvml, monkeypatch, tmp_path):
    nvml.counter_mj = [0, 1000]
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-rapl"))
    assert make_meter("nvidia", torch.device("cuda", 0)).name == "nvidia"
    assert counter_traced(make_meter("nvidia", torch.device("cuda", 0))) == []  # a power sensor, not the counter
    notes: list[str] = []
    m = auto_meter(torch.device("cuda", 0), notice=notes.append)
    assert m.name == "nvidia" and m.method == "counter"
    assert len(notes) == 1 and "RAPL" in notes[0] and "gpu:0" in notes[0]  # partial coverage says so

    # with a readable RAPL tree, auto sums the GPU and the CPU package, each reported separately
    zone = tmp_path / "rapl" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("0\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "rapl"))
    nvml.counter_mj = [0, 2000]
    m = auto_meter(torch.device("cuda", 0))
    assert isinstance(m, CompositeMeter) and m.name == "nvidia+rapl"
    assert counter_traced(m) == ["cpu:package-0"]  # RAPL has no power sensor: its trace is its counter's reads
    m.begin()
    (zone / "energy_uj").write_text("3000000\n")  # 3 J on the CPU package
    r = m.end()
    assert r.joules_by_device == {"gpu:0": pytest.approx(2.0), "cpu:package-0": pytest.approx(3.0)}
    assert r.joules == pytest.approx(5.0)
    assert r.devices_covered == ["gpu:0", "cpu:package-0"]
    assert r.method == "counter"


def _failed_window(meter: GpuMeter, sleep_s: float = 0.0) -> str:
    """The reason the guarded window fails with."""
    guarded = GuardedMeter(meter)
    guarded.begin()
    time.sleep(sleep_s)
    with pytest.raises(MeterFailed) as e:
        guarded.end()
    return str(e.value)


def test_power_above_the_gpu_power_limit_is_a_failed_window(nvml):
    nvml.counter_mj = [0, 10_000_000]  # 10 kJ in well under a second: far above 1.5 x the 700 W limit
    why = _failed_window(GpuMeter("nvidia", 0))
    assert why.startswith("meter nvidia read an impossible figure: gpu:0: 1e+04 J in ")
    assert f"above its {POWER_LIMIT_MARGIN * 700:g} W ceiling ({POWER_LIMIT_MARGIN:g} x its 700 W power limit)" in why


def test_without_a_readable_power_limit_the_gpu_ceiling_is_physical(nvml, monkeypatch):
    def refused(h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerManagementLimit", refused)
    nvml.counter_mj = [0, 50_000_000]
    why = _failed_window(GpuMeter("nvidia", 0))
    assert f"above its {GPU_MAX_W:g} W ceiling (physical ceiling of a GPU; its power limit is unreadable)" in why


def test_gpu_counter_going_backwards_is_a_failed_window(nvml):
    nvml.counter_mj = [5_000, 4_000]
    why = _failed_window(GpuMeter("nvidia", 0))
    assert why.startswith("meter nvidia read an impossible figure: gpu:0: -1 J in ")
    assert why.endswith("is below zero: the counter went backwards")


def test_sampled_power_above_the_limit_is_a_failed_window(monkeypatch):
    fake = FakeNVML(arch=pynvml.NVML_DEVICE_ARCH_PASCAL)
    fake.install(monkeypatch)
    fake.counter_mj = [0]
    fake.power_mw = 5_000_000_000  # a sensor claiming 5 MW
    why = _failed_window(GpuMeter("nvidia", 0, trace_period_s=0.02), sleep_s=0.1)
    assert why.startswith("meter nvidia read an impossible figure: gpu:0: ")
    assert "ceiling (1.5 x its 700 W power limit)" in why


def test_selfcheck_skips_trace_vs_counter_on_a_gpu_with_no_counter(monkeypatch):
    # A pre-Volta GPU's energy is its power trace's integral, so the trace cannot check it: selfcheck said
    # "trace vs counter ok, worst +0.0%" of a comparison of one number with itself.
    from moe_energy.bench import selfcheck

    fake = FakeNVML(arch=pynvml.NVML_DEVICE_ARCH_PASCAL)
    fake.install(monkeypatch)
    fake.counter_mj, fake.power_mw = [0], 100_000
    res = measure(nn.Linear(4, 2), torch.zeros(8, 4), 0.2, GpuMeter("nvidia", 0, trace_period_s=0.05), 16, warmup=0)
    rec = window_record(res)
    assert rec["method_by_device"] == {"gpu:0": "sampled"}
    assert rec["trace_energy_j"]["gpu:0"] == pytest.approx(rec["energy_by_device_j"]["gpu:0"])
    check = selfcheck.check_trace([selfcheck.Check("energy", "w", "ok", "", {"windows": [rec]})])
    assert check.status == "skip" and "no window has both a power trace and a counter reading" in check.detail


def test_a_failed_gpu_reading_closes_the_whole_composite_window(nvml, monkeypatch, tmp_path):
    # auto on a GPU host is nvidia+rapl. The GPU's counter went backwards (5 J -> 4 J): its end() raised, and the
    # RAPL part was never ended, so its power-trace thread sampled on and the next window of the same meter (the
    # API's next repeat, selfcheck's next check) was refused: "meter 'rapl': a window is already open on it".
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("0\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    monkeypatch.setenv(ENV_ROOT, str(tmp_path))
    m = auto_meter(torch.device("cuda", 0))
    assert isinstance(m, CompositeMeter) and m.name == "nvidia+rapl"
    assert counter_traced(m) == ["cpu:package-0"]  # RAPL has no power sensor: its trace is its counter's reads
    nvml.counter_mj = [5_000, 4_000]
    m.begin()
    with pytest.raises(ImpossibleReading, match="counter went backwards"):
        m.end()
    assert all(part._trace is None and part._t0 is None for part in m.meters)  # every part closed
    nvml.counter_mj = [4_000, 6_000]
    m.begin()
    (zone / "energy_uj").write_text("3000000\n")
    r = m.end()
    assert r.joules_by_device == {"gpu:0": pytest.approx(2.0), "cpu:package-0": pytest.approx(3.0)}


def test_a_counter_read_that_fails_at_an_edge_closes_the_window(nvml, monkeypatch):
    # begin() started the power trace and the clock, then NVML refused the counter: the trace thread polled on
    # and every later window of the meter (selfcheck's next checks) failed "a window is already open on it"
    # instead of measuring or naming the GPU's error.
    nvml.counter_mj = [1_000, 3_000]
    meter = GpuMeter("nvidia", 0)
    real = nvml.energy

    def lost(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lost)
    with pytest.raises(Exception, match="GPU is lost"):
        meter.begin()
    assert meter._trace is None and meter._t0 is None
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", real)
    meter.begin()
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lost)
    with pytest.raises(Exception, match="GPU is lost"):
        meter.end()
    assert meter._trace is None and meter._t0 is None
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", real)
    nvml.counter_mj = [3_000, 7_000]
    meter.begin()
    assert meter.end().joules_by_device == {"gpu:0": pytest.approx(4.0)}


def test_a_device_given_as_a_string_picks_its_gpu(nvml):
    # 'cuda:0' as a str: getattr(device, "index") found str.index, a method, and GpuMeter failed
    # "'<=' not supported between instances of 'int' and 'builtin_function_or_method'"; survey()'s own default
    # device "cpu" crashed the same way on any host with an NVIDIA GPU.
    from moe_energy.energy.select import survey
    from moe_energy.errors import ConfigError

    nvml.counter_mj = [0]
    meter = make_meter("nvidia", "cuda:0")
    assert (meter.index, meter.devices) == (0, ["gpu:0"])
    with pytest.raises(ConfigError, match=r"GPU index 1 not visible \(1 GPU\(s\)\)"):
        make_meter("nvidia", "cuda:1")
    [gpu] = [s for s in survey() if s.name == "nvidia"]
    assert (gpu.available, gpu.method, gpu.devices) == (True, "counter", ["gpu:0"])


def test_a_gpu_the_driver_cannot_query_is_reported_not_a_crash(nvml, monkeypatch, tmp_path):
    # NVML refused nvmlDeviceGetArchitecture (which decides counter or sampled): the raw ZeusGPUUnknownError
    # escaped GpuMeter, so 'moe-energy meters', selfcheck and auto on a CUDA run crashed instead of saying why.
    def unknown(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetArchitecture", unknown)
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-rapl"))
    from moe_energy.energy.select import survey

    [gpu] = [s for s in survey(torch.device("cuda", 0)) if s.name == "nvidia"]
    assert (gpu.available, gpu.kind) == (False, "unreadable")
    assert gpu.reason == "nvidia: cannot ask GPU 0 for an energy counter (ZeusGPUUnknownError: Unknown Error)"
    notes: list[str] = []
    assert auto_meter(torch.device("cuda", 0), notice=notes.append).method == "estimate"
    assert "nvidia: cannot ask GPU 0 for an energy counter" in notes[0]
