"""RAPL trees that are not what they claim (issue 17): each lie is a fake powercap tree of real files.

A zone whose files do not parse, whose range is not positive or whose counter sits outside its range is
unusable: `moe-energy meters` names it, `--meter auto` falls back and says why, `--meter rapl` exits 2 with
one line. A window whose counter goes back further than a wrap explains, or whose power is below zero or
above the zone's ceiling, is a failed window (inferences/J null, with the reason), never a counter figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUICK, TINY_SHAPE, TINY_TASK

from moe_energy.cli import main
from moe_energy.energy.meter import CounterMeter, ImpossibleReading, impossible
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
from moe_energy.measure.guard import GuardedMeter, MeterFailed

FAKE_RAPL = Path(__file__).resolve().parents[1] / "scripts" / "fake_rapl.py"
REAL_RANGE_UJ = 262_143_328_850
TINY = [*TINY_SHAPE, *TINY_TASK, *QUICK, "--repeats", "2", "--models", "dense_active"]


def zone(root: Path, zid: str = "intel-rapl:0", **files: bytes | str | int) -> Path:
    """A zone of real files: package-0 at 1 J of a 262 kJ range unless ``files`` says otherwise."""
    d = root / zid
    d.mkdir(parents=True, exist_ok=True)
    contents = {"name": "package-0", "energy_uj": 1_000_000, "max_energy_range_uj": REAL_RANGE_UJ, **files}
    for name, value in contents.items():
        (d / name).write_bytes(value if isinstance(value, bytes) else f"{value}\n".encode())
    return d


@pytest.fixture
def live_lie(tmp_path, monkeypatch):
    """scripts/fake_rapl.py with the given lie, as a live process; MOE_ENERGY_POWERCAP_ROOT points at it."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> Path:
        root = tmp_path / "powercap"
        proc = subprocess.Popen([sys.executable, str(FAKE_RAPL), str(root), *args], stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().startswith("ready")  # type: ignore[union-attr]
        monkeypatch.setenv(ENV_ROOT, str(root))
        return root

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def only_json(out: Path) -> dict:
    [f] = list(out.glob("run-*.json"))
    return json.loads(f.read_text())


LIES = {
    "name not text": ({"name": b"\xff\xfe"}, "name holds b'\\xff\\xfe', not text"),
    "energy not text": ({"energy_uj": b"\xff\xfe"}, "energy_uj holds b'\\xff\\xfe', not text"),
    "energy not a number": ({"energy_uj": "12abc"}, "energy_uj holds '12abc', not a whole number"),
    "range zero": ({"max_energy_range_uj": 0}, "max_energy_range_uj is 0: a counter's range"),
    "range negative": ({"max_energy_range_uj": -5}, "max_energy_range_uj is -5: a counter's range"),
    "range not a number": ({"max_energy_range_uj": "lots"}, "max_energy_range_uj holds 'lots', not a whole"),
    "energy above range": ({"energy_uj": 2_000_000, "max_energy_range_uj": 1_000_000},
                           "energy_uj reads 2000000, outside its range 0..1000000 uJ"),
    "limit not text": ({"constraint_0_max_power_uw": b"\xfe"}, "constraint_0_max_power_uw holds b'\\xfe'"),
}


@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
def test_unusable_zone_is_named_by_meters_and_refused_by_meter_rapl(lie, tmp_path, monkeypatch, capsys):
    files, why = LIES[lie]
    root = tmp_path / "powercap"
    zone(root, **files)
    with pytest.raises(RaplUnavailable) as e:
        discover(root)
    assert e.value.kind == "unusable" and "\n" not in str(e.value)
    assert str(e.value).startswith("RAPL: zone intel-rapl:0 is unusable: ") and why in str(e.value)

    monkeypatch.setenv(ENV_ROOT, str(root))
    code, out, _ = cli(capsys, "meters", "--device", "cpu")
    assert code == 0
    [row] = [line for line in out.splitlines() if "│ rapl" in line]
    assert "no (unusable)" in row and "zone intel-rapl:0 is unusable" in row
    [auto] = [line for line in out.splitlines() if line.startswith("--meter auto picks")]
    assert auto.startswith("--meter auto picks: estimate (estimate); no usable energy counter here (RAPL: zone "
                           "intel-rapl:0 is unusable: ") and why in auto

    code, out, err = cli(capsys, "run", *TINY, "--meter", "rapl", "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --meter rapl: RAPL: zone intel-rapl:0 is unusable: ") and why in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("run-*.json"))


def test_a_dram_sub_zone_that_lies_makes_the_tree_unusable(tmp_path):
    root = tmp_path / "powercap"
    zone(root)
    zone(root / "intel-rapl:0", "intel-rapl:0:0", name="dram", max_energy_range_uj=0)
    with pytest.raises(RaplUnavailable, match=r"^RAPL: zone intel-rapl:0:0 is unusable: .*max_energy_range_uj is 0"):
        discover(root)


def test_range_zero_counter_wrapping_every_5_j_is_refused_and_auto_falls_back(live_lie, tmp_path, capsys):
    # issue 17: max_energy_range_uj 0 with a counter really wrapping every 5 J at 40 W gave 0.376 J in 1 s
    live_lie("--watts", "40", "--max-range-uj", "0", "--wrap-uj", "5000000")
    code, _, err = cli(capsys, "run", *TINY, "--meter", "rapl", "--out", str(tmp_path / "rapl"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --meter rapl: RAPL: zone intel-rapl:0 is unusable: ")
    assert "max_energy_range_uj is 0" in err

    code, _, err = cli(capsys, "run", *TINY, "--out", str(tmp_path / "auto"))
    assert code == 0
    [notice] = [line for line in err.splitlines() if line.startswith("notice:")]
    assert notice.startswith("notice: no usable energy counter here (RAPL: zone intel-rapl:0 is unusable: ")
    assert "max_energy_range_uj is 0" in notice and "ESTIMATE" in notice
    doc = only_json(tmp_path / "auto")
    assert doc["energy_meter"]["name"] == "estimate" and "intel-rapl:0 is unusable" in doc["energy_meter"]["notice"]
    [m] = doc["models"]
    assert m["energy_method"] == "estimate" and len(m["windows"]) == 2
    assert all(w["energy_method"] == "estimate" for w in m["windows"])


def test_counter_reset_twice_per_window_fails_every_window(live_lie, tmp_path, capsys):
    # issue 17: a counter back to 0 twice per window gave 2.36 W and 87,330 W (true 40 W) as "counter"
    live_lie("--watts", "40", "--reset-every", "0.15")
    code, out, err = cli(capsys, "run", *TINY, "--meter", "rapl", "--out", str(tmp_path / "out"))
    assert code == 1 and "every measurement window failed" in err  # written, and never passed off as a result
    [m] = only_json(tmp_path / "out")["models"]
    assert len(m["windows"]) == 2 and [w["repeat"] for w in m["windows"]] == [0, 1]
    for w in m["windows"]:
        assert w["failed"].startswith("meter rapl read an impossible figure: cpu:package-0: counter went back from ")
        assert "a reset, not a wrap" in w["failed"] and f"above its {PACKAGE_MAX_W:g} W ceiling" in w["failed"]
        assert w["inferences_per_joule"] is None and w["energy_j"] is None and w["energy_method"] == "none"
        assert w["inferences_per_joule_reason"] == f"window failed: {w['failed']}"
    assert m["failed_windows"] == 2 and m["energy_j"] is None and m["inferences_per_joule"] is None
    assert "2 of 2 windows FAILED" in out


def test_power_above_the_zones_stated_limit_fails_the_window(live_lie):
    root = live_lie("--watts", "40", "--max-power-w", "10")
    [z] = discover(root)
    assert z.ceiling_w == LIMIT_MARGIN * 10 and "largest stated limit, 10 W" in z.ceiling_source
    meter = GuardedMeter(RaplMeter(root))
    meter.begin()
    time.sleep(0.3)
    with pytest.raises(MeterFailed) as e:
        meter.end()
    assert str(e.value).startswith("meter rapl read an impossible figure: cpu:package-0: ")
    assert f"above its {LIMIT_MARGIN * 10:g} W ceiling ({LIMIT_MARGIN:g} x the zone's largest stated limit, 10 W)" \
        in str(e.value)


@pytest.mark.parametrize(("zid", "name", "step_uj", "cap", "source"), [
    ("intel-rapl:0", "package-0", 5_000 * 10**6, PACKAGE_MAX_W, "physical ceiling of a CPU package"),
    ("intel-rapl:0:1", "dram", 2_000 * 10**6, DRAM_MAX_W, "physical ceiling of a socket's DRAM"),
])
def test_power_above_the_physical_ceiling_fails_the_window(tmp_path, zid, name, step_uj, cap, source):
    root = tmp_path / "powercap"
    zone(root)
    d = zone(root / "intel-rapl:0" if zid.count(":") == 2 else root, zid, name=name)
    meter = GuardedMeter(RaplMeter(root))
    meter.begin()
    (d / "energy_uj").write_text(f"{1_000_000 + step_uj}\n")  # thousands of J in well under a second
    with pytest.raises(MeterFailed) as e:
        meter.end()
    device = "cpu:package-0" if name == "package-0" else "dram:package-0"
    assert str(e.value).startswith(f"meter rapl read an impossible figure: {device}: {step_uj / 1e6:g} J in ")
    assert f"above its {cap:g} W ceiling ({source})" in str(e.value)

    meter.begin()  # a step a real counter makes (2 J) passes whatever the window's length
    (d / "energy_uj").write_text(f"{1_000_000 + step_uj + 2_000_000}\n")
    m = meter.end()
    assert m.joules_by_device is not None and m.joules_by_device[device] == pytest.approx(2.0)


def test_counter_above_its_range_mid_window_fails_the_window(tmp_path):
    d = zone(tmp_path, max_energy_range_uj=10_000_000)
    meter = GuardedMeter(RaplMeter(tmp_path))
    meter.begin()
    (d / "energy_uj").write_text("20000000\n")
    with pytest.raises(MeterFailed, match=r"impossible figure: cpu:package-0: energy_uj reads 20000000, above "
                                          r"its range 10000000 uJ"):
        meter.end()


def test_energy_file_turning_to_garbage_mid_run_fails_the_window_not_the_run(tmp_path):
    d = zone(tmp_path)
    meter = GuardedMeter(RaplMeter(tmp_path))
    meter.begin()
    (d / "energy_uj").write_bytes(b"\xff\xfe")
    with pytest.raises(MeterFailed) as e:
        meter.end()
    assert str(e.value).startswith("meter rapl could not read the window: RAPL: zone intel-rapl:0 is unusable: ")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_unwrapper_tells_a_reset_from_a_wrap(tmp_path):
    d = zone(tmp_path, energy_uj=REAL_RANGE_UJ - 2_000_000)
    [z] = discover(tmp_path)
    clock = Clock()
    u = Unwrapper([z], tmp_path, clock=clock)
    a = u()["cpu:package-0"]
    clock.t = 0.1
    (d / "energy_uj").write_text("2000000\n")  # 4 J in 0.1 s across the range: a wrap
    b = u()["cpu:package-0"]
    assert b - a == pytest.approx(4.0) and u.wraps == 1 and u.jumps == []
    clock.t = 0.2
    (d / "energy_uj").write_text("500000\n")  # back 1.5 J in 0.1 s: a wrap would be 2.6 MW
    c = u()["cpu:package-0"]
    assert u.wraps == 1 and c - b == pytest.approx(0.5)  # counting goes on from where the counter was
    [(dev, why)] = u.jumps
    assert dev == "cpu:package-0" and why.startswith("cpu:package-0: counter went back from 2000000 to 500000 uJ")
    assert why.endswith(f"above its {PACKAGE_MAX_W:g} W ceiling: a reset, not a wrap")


def test_impossible_names_below_zero_and_above_ceiling():
    ceilings = {"a": (100.0, "test ceiling"), "b": (100.0, "test ceiling")}
    assert impossible({"a": 50.0, "b": 100.0}, 1.0, ceilings) == []
    assert impossible({"a": 101.0}, 1.0, ceilings, stale_s=0.01) == []  # within one counter update
    assert impossible({"a": float("nan"), "c": 1e12}, 1.0, ceilings) == []  # NaN: the guard's; c: no ceiling
    [neg, high] = impossible({"a": -2.0, "b": 300.0}, 2.0, ceilings)
    assert neg == "a: -2 J in 2 s (-1 W) is below zero: the counter went backwards"
    assert high == "b: 300 J in 2 s is 150 W, above its 100 W ceiling (test ceiling)"


class SteppedCounter(CounterMeter):
    """A counter the test moves by hand (cumulative J)."""

    name = "stepped"
    method = "counter"
    devices = ["x:0"]

    def __init__(self) -> None:
        super().__init__(trace_period_s=10.0)
        self.j = 100.0

    def _read(self) -> dict[str, float]:
        return {"x:0": self.j}


def test_a_counter_going_backwards_is_a_failed_window_through_the_guard():
    meter = SteppedCounter()
    meter.begin()
    meter.j = 95.0
    with pytest.raises(ImpossibleReading, match=r"^x:0: -5 J in .* is below zero"):
        meter.end()
    assert meter._trace is None and meter._t0 is None  # the window is closed
    guarded = GuardedMeter(meter)
    guarded.begin()
    meter.j = 90.0
    with pytest.raises(MeterFailed, match=r"^meter stepped read an impossible figure: x:0: -5 J in "):
        guarded.end()
