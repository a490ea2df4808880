"""Other processes' CPU use: read from /proc/stat (a fake one made of real files, or this host's own with a real
process burning a CPU beside the window); a window or idle reading they crowded is flagged, a quiet one is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_energy.commands.tables import energy_summary
from moe_energy.energy.contention import OTHERS_FLAG_CPUS, CpuShare, CpuUse, busy_seconds
from moe_energy.energy.estimate import EstimateMeter
from moe_energy.energy.idle import measure_idle
from moe_energy.measure.window import measure

HZ = os.sysconf("SC_CLK_TCK")
REAL_STAT = Path("/proc/stat")


def write_stat(path: Path, user: int, system: int, idle: int, iowait: int = 0, steal: int = 0) -> None:
    path.write_text(f"cpu  {user} 0 {system} {idle} {iowait} 0 0 {steal} 0 0\n"
                    f"cpu0 {user} 0 {system} {idle} {iowait} 0 0 {steal} 0 0\nintr 1 2 3\n")


def test_busy_seconds_counts_user_system_and_steal_not_idle_or_iowait(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, user=300, system=100, idle=5000, iowait=700, steal=50)
    assert busy_seconds(stat) == pytest.approx(450 / HZ)
    for bad in ("", "intr 1 2\n", "cpu a b c d\n"):
        stat.write_text(bad)
        assert busy_seconds(stat) is None
    assert busy_seconds(tmp_path / "absent") is None


def test_a_window_that_others_kept_busy_is_flagged_and_a_quiet_one_is_not(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, user=1000, system=0, idle=0)
    share = CpuShare(stat)
    share.begin()
    time.sleep(0.2)
    write_stat(stat, user=1000 + round(1.5 * 0.2 * HZ), system=0, idle=0)  # 1.5 CPUs of others over 0.2 s
    use = share.end(0.2)
    assert use is not None and use.seconds == 0.2
    assert 1.45 <= use.other_cpus <= 1.5 + 1e-9  # a sleep: this process used next to nothing
    assert use.flag().startswith(f"other processes kept {use.other_cpus:.2f} CPUs busy during the window")
    assert use.flag("the idle reading").startswith("other processes kept") and "during the idle reading" in \
        use.flag("the idle reading")
    quiet = CpuUse(1.0, host_cpus=2.0, own_cpus=2.0 - OTHERS_FLAG_CPUS + 0.01)
    assert quiet.flag() is None and CpuUse(1.0, 1.0, 2.0).other_cpus == 0.0  # own time may outrun the host's ticks
    share.begin()
    stat.unlink()
    assert share.end(0.2) is None  # /proc/stat gone at an edge: nothing said, nothing invented
    assert CpuShare(tmp_path / "absent").end(1.0) is None


@pytest.mark.skipif(not REAL_STAT.exists(), reason="no /proc/stat on this platform")
def test_a_real_process_burning_a_cpu_flags_the_idle_reading_and_the_window(tmp_path):
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nprint('spinning', flush=True)\n"
                               "while time.time() - t < 30: pass"], stdout=subprocess.PIPE, text=True)
    try:
        # spinning before the idle reading starts: a fixed sleep was no proof where the interpreter starts slowly
        assert burner.stdout.readline() == "spinning\n"  # type: ignore[union-attr]
        idle = measure_idle(EstimateMeter(10.0), 0.8)
        res = measure(nn.Linear(8, 2), torch.zeros(4, 8), 0.8, EstimateMeter(10.0), 32, warmup=0)
    finally:
        burner.kill()
        burner.wait()
        burner.stdout.close()  # type: ignore[union-attr]
    assert idle is not None and any(f.startswith("other processes kept") and "during the idle reading" in f
                                    for f in idle.flags), idle.flags
    crowded = [f for f in res.flags if f.startswith("other processes kept")]
    assert len(crowded) == 1 and "during the window" in crowded[0], res.flags
    assert float(crowded[0].split()[3]) >= OTHERS_FLAG_CPUS
    doc = {"energy_meter": {"name": "estimate", "method": "estimate"}, "idle": idle.as_dict(),
           "models": [{"windows": [{"flags": res.flags}, {"flags": []},
                                   {"flags": ["estimate: 10 W TDP x process CPU utilisation, not a measurement"]}]}]}
    lines = energy_summary(doc)
    assert any(line.startswith("idle power warning: other processes kept") for line in lines), lines
    # an estimate's label names the method, it is no warning
    assert any(line.startswith("1 of 3 windows carry warnings") and "the first: " in line for line in lines), lines


def test_the_idle_readings_estimate_label_is_no_idle_power_warning():
    """The estimate's label names the method (as in a window's flags, it is no warning): the run's summary prints
    an 'idle power warning' line only for a real fault of the idle reading, such as a crowded one."""
    label = "estimate: 10 W TDP (default 5 W x 2 logical CPUs) x process CPU utilisation, not a measurement"
    crowded = "other processes kept 1.06 CPUs busy during the idle reading (this one 0.01)"
    idle = {"seconds": 5.0, "method": "estimate", "power_w": 0.01, "flags": [label]}
    doc = {"energy_meter": {"name": "estimate", "method": "estimate"}, "idle": idle,
           "models": [{"windows": [{"flags": [label]}]}]}
    lines = energy_summary(doc)
    assert any(line.startswith("idle power: 0.01 W (estimate) over 5.0 s") for line in lines), lines
    assert not any(line.startswith("idle power warning") for line in lines), lines
    assert not any("windows carry warnings" in line for line in lines), lines
    idle["flags"] = [crowded, label]
    assert [line for line in energy_summary(doc) if line.startswith("idle power warning")] == [
        f"idle power warning: {crowded}"]
