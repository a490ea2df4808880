"""The Apple silicon meter through zeus's real SoC layer over a fake ``zeus_apple_silicon`` (the C++ extension, the
lowest layer): each way the monitor can fail is labelled for what it is, and ``auto`` still falls back."""

from __future__ import annotations

import platform
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("zeus.device.soc.apple")
from zeus.device.soc import apple as zeus_apple  # noqa: E402

from moe_energy.energy import select  # noqa: E402
from moe_energy.energy.apple import AppleMeter, AppleUnavailable  # noqa: E402
from moe_energy.energy.estimate import EstimateMeter  # noqa: E402
from moe_energy.energy.rapl import ENV_ROOT  # noqa: E402

FIELDS = ("cpu_total_mj", "efficiency_cores_mj", "performance_cores_mj", "efficiency_cluster_mj",
          "performance_cluster_mj", "efficiency_core_manager_mj", "performance_core_manager_mj", "dram_mj",
          "gpu_mj", "gpu_sram_mj", "ane_mj")


def metrics(**mj: int) -> SimpleNamespace:
    """An AppleEnergyMetrics as the extension returns it: every field, None where the chip has no channel."""
    return SimpleNamespace(**{f: mj.get(f) for f in FIELDS})


class FakeMonitor:
    """zeus_apple_silicon.AppleEnergyMonitor: ``fail`` is what its constructor raises (IOReport refused)."""

    fail: BaseException | None = None
    reading: SimpleNamespace = metrics(cpu_total_mj=1000, gpu_mj=500, dram_mj=200, ane_mj=0)

    def __init__(self) -> None:
        if FakeMonitor.fail is not None:
            raise FakeMonitor.fail

    def get_cumulative_energy(self) -> SimpleNamespace:
        return FakeMonitor.reading


@pytest.fixture
def mac(monkeypatch, tmp_path):
    """An Apple silicon Mac with zeus-apple-silicon installed, as zeus's SoC layer sees it."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    monkeypatch.setattr(zeus_apple, "zeus_apple_silicon", SimpleNamespace(AppleEnergyMonitor=FakeMonitor))
    monkeypatch.setattr(zeus_apple, "zeus_apple_available", True)
    monkeypatch.setattr(FakeMonitor, "fail", None)
    monkeypatch.setattr(FakeMonitor, "reading", FakeMonitor.reading)
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-powercap"))
    zeus_apple.apple_silicon_is_available.cache_clear()
    yield FakeMonitor
    zeus_apple.apple_silicon_is_available.cache_clear()


def unavailable() -> AppleUnavailable:
    with pytest.raises(AppleUnavailable) as e:
        AppleMeter()
    return e.value


def test_a_working_monitor_gives_each_subsystem_in_joules(mac):
    m = AppleMeter()
    assert m.devices == ["ane:soc", "cpu:soc", "dram:soc", "gpu:soc"]
    assert m._read() == {"cpu:soc": 1.0, "gpu:soc": 0.5, "dram:soc": 0.2, "ane:soc": 0.0}


def test_not_a_mac_or_no_library_is_absent(mac, monkeypatch):
    monkeypatch.setattr(zeus_apple, "zeus_apple_available", False)
    zeus_apple.apple_silicon_is_available.cache_clear()
    e = unavailable()
    assert e.kind == "zeus missing" and "zeus-apple-silicon is not installed" in str(e)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    e = unavailable()
    assert e.kind == "absent" and str(e) == "apple: not an Apple silicon Mac"


def test_a_refused_ioreport_subscription_is_unreadable_not_a_permission(mac):
    mac.fail = RuntimeError("Failed to create IOReport subscription.")
    e = unavailable()
    assert e.kind == "unreadable"
    assert "Failed to create IOReport subscription." in str(e)


def test_a_permission_error_is_no_permission(mac):
    mac.fail = PermissionError(1, "Operation not permitted")
    e = unavailable()
    assert e.kind == "no permission" and "Operation not permitted" in str(e)


def test_a_first_reading_that_fails_or_holds_nothing_is_unreadable(mac):
    # an older zeus-apple-silicon whose metrics lack the fields zeus's SoC layer reads: AttributeError in zeus
    mac.reading = SimpleNamespace(cpu_total_mj=1000, gpu_mj=500)
    e = unavailable()
    assert e.kind == "unreadable" and "efficiency_cores_mj" in str(e)
    mac.reading = metrics()  # the sample held no IOReport channels: every field None
    e = unavailable()
    assert e.kind == "unreadable" and "no SoC energy channel" in str(e)


def test_auto_falls_back_to_the_estimate_whatever_the_cause_and_meters_says_why(mac):
    for fail, reading, kind in ((RuntimeError("Failed to create IOReport subscription."), None, "unreadable"),
                                (None, SimpleNamespace(cpu_total_mj=1), "unreadable"),
                                (PermissionError(13, "Permission denied"), None, "no permission")):
        mac.fail = fail
        if reading is not None:
            mac.reading = reading
        notes: list[str] = []
        meter = select.auto_meter("cpu", notice=notes.append)
        assert isinstance(meter, EstimateMeter)
        assert notes and notes[0].startswith("no usable energy counter here (apple: ")
        [status] = [s for s in select.survey("cpu") if s.name == "apple"]
        assert (status.available, status.kind) == (False, kind)
