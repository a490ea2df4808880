"""RAPL through a fake powercap tree of real files, advanced by scripts/fake_rapl.py at a known power."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import one_line

from moe_energy.energy.rapl import (
    DRAM_MAX_W,
    ENV_ROOT,
    LIMIT_MARGIN,
    PACKAGE_MAX_W,
    RaplMeter,
    RaplUnavailable,
    Unwrapper,
    discover,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fake_rapl.py"


class FakeRapl:
    """scripts/fake_rapl.py as a live process; stopped when the test ends."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), str(root), *args], stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready"), line

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def fake_rapl(tmp_path):
    started: list[FakeRapl] = []

    def start(*args: str, root: Path | None = None) -> FakeRapl:
        f = FakeRapl(root or tmp_path / "powercap", *args)
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


def write_zone(root: Path, zid: str, name: str, uj: int, max_uj: int = 10**12) -> Path:
    d = root / zid
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


@pytest.mark.slow
def test_two_second_window_at_40_w_reads_80_j(fake_rapl):
    f = fake_rapl("--watts", "40")
    meter = RaplMeter(f.root)
    assert meter.devices == ["cpu:package-0"]  # the core sub-zone is inside the package: not summed
    meter.begin()
    time.sleep(2.0)
    m = meter.end()
    assert m.method == "counter" and m.meter == "rapl"
    assert m.joules_by_device is not None
    assert m.joules_by_device["cpu:package-0"] == pytest.approx(40.0 * m.seconds, rel=0.10)
    assert m.joules == pytest.approx(80.0, rel=0.10)
    # the power trace (RAPL deltas at ~10 Hz) sits near 40 W and integrates to the counter's joules
    pts = m.trace["cpu:package-0"]
    assert len(pts) >= 10
    assert sorted(w for _, w in pts)[len(pts) // 2] == pytest.approx(40.0, rel=0.15)
    assert m.trace_energy_j()["cpu:package-0"] == pytest.approx(m.joules, rel=0.05)
    assert not any("trace integrates" in x for x in m.flags)


@pytest.mark.slow
def test_wraparound_inside_the_window(fake_rapl):
    max_uj = 100_000_000  # 100 J range; starting 20 J below it, 40 W wraps after 0.5 s
    f = fake_rapl("--watts", "40", "--max-range-uj", str(max_uj), "--start-uj", str(max_uj - 20_000_000))
    meter = RaplMeter(f.root)
    counter = f.root / "intel-rapl:0" / "energy_uj"
    before = int(counter.read_text())
    meter.begin()
    time.sleep(1.5)
    m = meter.end()
    after = int(counter.read_text())
    assert after < before, "the fake counter should have wrapped inside the window"
    assert m.joules == pytest.approx(40.0 * m.seconds, rel=0.10)
    assert m.joules > 0


@pytest.mark.slow
def test_two_wraps_inside_one_window(fake_rapl):
    # A 40 J range at 40 W wraps every second: a 2.5 s window holds two wraps or three. Read at its edges only, the
    # counter shows one at most (AMD's 65 kJ range wraps like this every 4 min at 280 W); every read counts.
    max_uj = 40_000_000
    f = fake_rapl("--watts", "40", "--max-range-uj", str(max_uj), "--start-uj", str(max_uj - 5_000_000),
                  "--max-power-w", "50")  # a 100 W ceiling: a wrap hides only between reads 0.4 s apart
    meter = RaplMeter(f.root)
    meter.begin()
    time.sleep(2.5)
    m = meter.end()
    assert m.joules == pytest.approx(40.0 * m.seconds, rel=0.10)
    assert not any("undercounted" in x for x in m.flags), m.flags


def test_unwrapper_adds_one_range_per_wrap(tmp_path):
    d = write_zone(tmp_path, "intel-rapl:0", "package-0", 999_000, max_uj=1_000_000)
    [zone] = discover(tmp_path)
    u = Unwrapper([zone], tmp_path)
    a = u()["cpu:package-0"]
    (d / "energy_uj").write_text("500\n")  # wrapped: 999,000 -> 1,000,000 -> 0 -> 500 uJ
    b = u()["cpu:package-0"]
    assert b - a == pytest.approx(1_500 / 1e6)
    assert u.wraps == 1


def test_dram_counted_core_and_psys_not(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    write_zone(tmp_path, "intel-rapl:0:0", "core", 0)
    write_zone(tmp_path, "intel-rapl:0:1", "uncore", 0)
    write_zone(tmp_path, "intel-rapl:0:2", "dram", 0)
    write_zone(tmp_path, "intel-rapl:1", "psys", 0)
    write_zone(tmp_path / "intel-rapl:0", "intel-rapl:0:2", "dram", 0)  # real trees nest sub-zones too
    assert [z.device for z in discover(tmp_path)] == ["cpu:package-0", "dram:package-0"]


def test_each_zone_gets_a_ceiling_from_its_kind_and_its_stated_limits(tmp_path):
    pkg = write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (pkg / "constraint_0_max_power_uw").write_text("15000000\n")  # a 15 W TDP...
    (pkg / "constraint_1_power_limit_uw").write_text("44000000\n")  # ...whose PL2 is 44 W
    (pkg / "constraint_2_max_power_uw").mkdir()  # a value the kernel cannot give (ENODATA): skipped
    dram = write_zone(tmp_path, "intel-rapl:0:1", "dram", 0)
    (dram / "constraint_0_max_power_uw").write_text("0\n")  # 0: no limit stated
    other = write_zone(tmp_path, "intel-rapl:1", "package-1", 0)
    (other / "constraint_0_power_limit_uw").write_text("4095875000\n")  # "unlimited": the kind's ceiling holds
    zones = {z.device: z for z in discover(tmp_path)}
    assert zones["cpu:package-0"].ceiling_w == LIMIT_MARGIN * 44
    assert zones["cpu:package-0"].ceiling_source == f"{LIMIT_MARGIN:g} x the zone's largest stated limit, 44 W"
    assert (zones["dram:package-0"].ceiling_w, zones["dram:package-0"].ceiling_source) == \
        (DRAM_MAX_W, "physical ceiling of a socket's DRAM")
    assert (zones["cpu:package-1"].ceiling_w, zones["cpu:package-1"].ceiling_source) == \
        (PACKAGE_MAX_W, "physical ceiling of a CPU package")


def test_live_dram_zone_reported_separately(fake_rapl):
    f = fake_rapl("--watts", "30", "--dram-watts", "6")
    meter = RaplMeter(f.root)
    meter.begin()
    time.sleep(1.0)
    m = meter.end()
    assert m.joules_by_device["cpu:package-0"] == pytest.approx(30 * m.seconds, rel=0.10)
    assert m.joules_by_device["dram:package-0"] == pytest.approx(6 * m.seconds, rel=0.10)
    assert m.joules == pytest.approx(36 * m.seconds, rel=0.10)


def test_zero_delta_flagged(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 12345)
    meter = RaplMeter(tmp_path)
    meter.begin()
    m = meter.end()
    assert m.joules == 0
    assert any("did not advance" in x for x in m.flags)


def test_absent_tree_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "nowhere"))
    with pytest.raises(RaplUnavailable) as e:
        RaplMeter()
    one_line(str(e.value), longest=400)
    assert "no powercap tree" in str(e.value) and e.value.kind == "absent"


def test_energy_file_that_cannot_be_read_gives_one_line(tmp_path):
    d = write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (d / "energy_uj").unlink()
    (d / "energy_uj").mkdir()  # open() fails with EISDIR even for root
    with pytest.raises(RaplUnavailable) as e:
        RaplMeter(tmp_path)
    one_line(str(e.value), longest=400)
    assert "energy_uj" in str(e.value) and "cannot read" in str(e.value)
    shutil.rmtree(d / "energy_uj")
    with pytest.raises(RaplUnavailable) as e:  # missing file
        RaplMeter(tmp_path)
    one_line(str(e.value), longest=400)


def _discover_as_nobody(root: Path) -> str:
    """discover() in a forked child that dropped root: a real EACCES from the kernel."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                discover(root)
                msg = "readable"
            except RaplUnavailable as e:
                msg = f"{e.kind}|{e}"
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            msg = f"error|{e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_permission_denied_says_how_to_grant_access():
    # Like Linux >= 5.10: energy_uj readable by root only (0400). Root reads anything, so as root we drop
    # to 'nobody' in a child; as a normal user the 0400 file already refuses us.
    root = Path(tempfile.mkdtemp(prefix="moe-energy-rapl-"))
    try:
        root.chmod(0o755)
        d = write_zone(root, "intel-rapl:0", "package-0", 0)
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o444)
        (d / "energy_uj").chmod(0o400)
        if os.geteuid() == 0:
            out = _discover_as_nobody(root)
        else:
            os.chown(d / "energy_uj", os.getuid(), os.getgid())
            (d / "energy_uj").chmod(0o000)
            try:
                discover(root)
                out = "readable"
            except RaplUnavailable as e:
                out = f"{e.kind}|{e}"
        kind, _, msg = out.partition("|")
        assert kind == "no permission", out
        one_line(msg)
        assert "energy_uj" in msg and "chmod a+r" in msg and "root" in msg
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_sync_that_fails_at_the_windows_end_closes_the_window(tmp_path):
    # An asynchronous device error (or Ctrl-C) surfaces in the end edge's sync: the window was left open with its
    # trace sampling, and the meter's next window was refused "a window is already open on it".
    from moe_energy.energy.meter import window

    d = write_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    meter = RaplMeter(tmp_path)
    calls = []

    def sync():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"), window(meter, "bench", sync):
        pass
    assert meter._trace is None and meter._t0 is None
    with window(meter, "bench", lambda: None) as w:
        (d / "energy_uj").write_text("1005000\n")  # 5 mJ
    assert w.result.joules_by_device == {"cpu:package-0": pytest.approx(0.005)}


def test_a_composite_whose_part_fails_to_begin_closes_the_parts_it_began(tmp_path):
    # RAPL began (trace sampling), then the second part refused: RAPL's window was left open, and the meter's next
    # window was refused "a window is already open on it".
    from moe_energy.energy.meter import CompositeMeter

    d = write_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    first, second = RaplMeter(tmp_path), RaplMeter(tmp_path)
    second.begin()  # open elsewhere: the composite's begin() fails on it and must leave that window alone
    both = CompositeMeter([first, second])
    with pytest.raises(Exception, match="a window is already open on it"):
        both.begin()
    assert first._trace is None and first._t0 is None
    assert second._trace is not None  # not the composite's window to close
    second.abort()
    both.begin()
    (d / "energy_uj").write_text("1002000\n")  # 2 mJ
    assert both.end().joules_by_device == {"cpu:package-0": pytest.approx(0.002)}
