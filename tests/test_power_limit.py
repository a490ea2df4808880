"""Power caps end to end: the NVIDIA path through Zeus's real device layer over a fake NVML (only pynvml's
functions are faked), the CPU path over a fake powercap tree of real files. Set, measure, read back, restore
on every way out (normal end, an error, a failed window, Ctrl-C and SIGTERM in the middle of a window), refuse
before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from conftest import QUICK, TINY_SHAPE, TINY_TASK, error_line

pynvml = pytest.importorskip("pynvml")
pytest.importorskip("zeus")

from test_energy_gpu import FakeNVML  # noqa: E402
from test_energy_rapl import write_zone  # noqa: E402

from moe_energy.cli import main  # noqa: E402
from moe_energy.config import PowerCaps  # noqa: E402
from moe_energy.energy.gpu import GpuMeter, open_gpus  # noqa: E402
from moe_energy.energy.rapl import ENV_ROOT  # noqa: E402
from moe_energy.errors import ConfigError  # noqa: E402
from moe_energy.interrupts import Interrupted  # noqa: E402
from moe_energy.power.limits import (  # noqa: E402
    GpuPowerLimit,
    RaplPowerLimit,
    applied,
    check,
    cpu_limits,
    sweep_caps,
)

TINY = [*TINY_SHAPE, *TINY_TASK, *QUICK, "--models", "moe,dense_active"]
LAYER = ["--arch", "custom", "--d-model", "32", "--ffn-dim", "16", "--experts", "4", "--top-k", "2", "--tokens", "4",
         "--warmup", "0", "--device", "cpu", "--cooldown", "0", "--idle-seconds", "0", "--repeats", "1",
         "--duration", "0.3", "--models", "moe,dense_total"]


class CappableNVML(FakeNVML):
    """FakeNVML with a power limit to set: a range, a permission, and a GPU that draws 80 % of its limit (so
    the counter's joules follow the cap in force). Every set is logged in mW."""

    def __init__(self, lo_w: float = 200, hi_w: float = 700, limit_w: float = 700) -> None:
        super().__init__()
        self.range_mw = (int(lo_w * 1000), int(hi_w * 1000))
        self.limit_mw = int(limit_w * 1000)
        self.permitted = True
        self.fail_set_to: int | None = None  # a set to this value fails (a restore that cannot happen)
        self.sets: list[int] = []
        self.energy_mj, self._last = 1_000_000.0, time.perf_counter()
        self.back_at: int | None = None  # a set to this value makes the next window's end read go back
        self._back_in = 0
        self.signal_after: tuple[int, int] | None = None  # (signal, power samples under a cap before sending it)

    def _advance(self) -> None:
        now = time.perf_counter()
        self.energy_mj += (now - self._last) * 0.8 * self.limit_mw
        self._last = now

    def energy(self, handle) -> int:
        self.log.append("energy")
        self._advance()
        if self._back_in:
            self._back_in -= 1
            if self._back_in == 0:  # the window's end: 5 J below its beginning
                return int(self.energy_mj) - 5_000_000
        return int(self.energy_mj)

    def field_values(self, handle, fields):
        self.log.append("power")
        self.power_mw = int(0.8 * self.limit_mw)
        if self.signal_after is not None and self.limit_mw != self.range_mw[1]:
            sig, left = self.signal_after
            self.signal_after = (sig, left - 1) if left > 1 else None
            if left <= 1:
                os.kill(os.getpid(), sig)  # from the sampler's thread, in the middle of the window
        return super().field_values(handle, fields)

    def set_limit(self, handle, mw: int) -> None:
        if not self.permitted:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        if not self.range_mw[0] <= mw <= self.range_mw[1]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if mw == self.fail_set_to:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
        self._advance()
        self.sets.append(mw)
        self.limit_mw = mw
        self._back_in = 2 if mw == self.back_at else 0  # the begin read, then the end read

    def install(self, monkeypatch) -> None:
        super().install(monkeypatch)
        for name, fn in {
            "nvmlDeviceGetPowerManagementLimit": lambda h: self.limit_mw,
            "nvmlDeviceGetPowerManagementLimitConstraints": lambda h: self.range_mw,
            "nvmlDeviceSetPowerManagementLimit": self.set_limit,
        }.items():
            monkeypatch.setattr(pynvml, name, fn)


@pytest.fixture
def nvml(monkeypatch):
    fake = CappableNVML()
    fake.install(monkeypatch)
    return fake


def one_doc(out: Path) -> dict:
    [f] = list(out.glob("run-*.json"))
    return json.loads(f.read_text())


# ---------------------------------------------------------------------------------------------------------
# NVIDIA: set, measure, read back, restore


@pytest.mark.slow
def test_two_caps_measure_every_model_at_each_and_restore(nvml, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", *TINY, "--meter", "nvidia", "--power-limit", "250,300", "--out", str(out)]) == 0
    assert nvml.limit_mw == 700_000  # restored
    # the probe writes the limit in force back unchanged, then each cap is set and the original put back
    assert nvml.sets == [700_000, 250_000, 700_000, 300_000, 700_000]
    doc = one_doc(out)
    names = [m["name"] for m in doc["models"]]
    assert names == ["moe[auto]@250W", "dense_active@250W", "moe[auto]@300W", "dense_active@300W"]
    for m in doc["models"]:
        cap = m["power_limit_requested_w"]
        assert m["status"] == "measured" and m["power_limit_w"] == cap
        [w] = m["windows"]
        assert w["power_limit_w"] == cap and w["state_end"]["gpu:0"]["power_limit_w"] == cap
        assert w["average_power_w"] == pytest.approx(0.8 * cap, rel=0.05)  # the fake draws 80 % of its cap
    limits = doc["power_limits"]
    assert [s["requested_w"] for s in limits["gpu"]] == [250, 300]
    assert [s["read_back_w"] for s in limits["gpu"]] == [{"gpu:0": 250.0}, {"gpu:0": 300.0}]
    assert all(s["original_w"] == {"gpu:0": 700.0} and s["restored_w"] == {"gpu:0": 700.0} for s in limits["gpu"])
    shown = capsys.readouterr()
    assert "cap W (read" in shown.out and "dense_activ" in shown.out  # the table folds long names
    assert "GPU power caps, each a whole run: 250 W (read back gpu:0 250 W); 300 W" in shown.out
    assert "power cap 250 W set; read back: gpu:0 250 W" in shown.err


def test_sweep_runs_from_the_maximum_down_in_25_w_steps(monkeypatch, tmp_path):
    fake = CappableNVML(lo_w=650, hi_w=700)
    fake.install(monkeypatch)
    assert sweep_caps([GpuPowerLimit(open_gpus("nvidia"), 0)]) == [700, 675, 650]
    fake.range_mw = (660_000, 700_000)  # Zeus stops above the minimum when the steps do not land on it
    assert sweep_caps([GpuPowerLimit(open_gpus("nvidia"), 0)]) == [700, 675]
    out = tmp_path / "out"
    assert main(["run", *TINY, "--models", "dense_active", "--meter", "nvidia", "--power-limit", "sweep",
                 "--out", str(out)]) == 0
    doc = one_doc(out)
    assert [m["name"] for m in doc["models"]] == ["dense_active@700W", "dense_active@675W"]
    assert fake.limit_mw == 700_000


@pytest.mark.slow
def test_llm_layers_at_two_caps(nvml, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", *LAYER, "--meter", "nvidia", "--power-limit", "300,250", "--out", str(out)]) == 0
    assert nvml.limit_mw == 700_000
    doc = one_doc(out)
    assert [m["name"] for m in doc["models"]] == ["moe[auto]@T=4@300W", "dense_total@T=4@300W",
                                                  "moe[auto]@T=4@250W", "dense_total@T=4@250W"]
    assert [m["power_limit_w"] for m in doc["models"]] == [300, 300, 250, 250]
    assert all(w["power_limit_w"] == m["power_limit_requested_w"] for m in doc["models"] for w in m["windows"])
    assert "cap W (read" in capsys.readouterr().out


def test_a_failed_window_under_a_cap_still_restores(nvml, tmp_path):
    out = tmp_path / "out"
    nvml.back_at = 250_000  # the first window at the cap reads a counter gone backwards
    assert main(["run", *TINY, "--models", "dense_active", "--meter", "nvidia", "--repeats", "2",
                 "--power-limit", "250", "--out", str(out)]) == 0
    [m] = one_doc(out)["models"]
    assert m["failed_windows"] == 1 and m["repeats"] == 1 and "went backwards" in m["windows"][0]["failed"]
    assert m["power_limit_w"] == 250 and nvml.limit_mw == 700_000


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_middle_of_a_window_restores_the_limit(nvml, tmp_path, capsys, sig, code):
    out = tmp_path / "out"
    nvml.signal_after = (sig, 2)  # the second power sample of the first capped window
    assert main(["run", *TINY, "--duration", "2", "--meter", "nvidia", "--power-limit", "250,300",
                 "--out", str(out)]) == code
    assert nvml.signal_after is None, "the signal was sent"
    assert nvml.limit_mw == 700_000 and nvml.sets == [700_000, 250_000, 700_000]  # 300 W never set
    assert not out.exists() or not list(out.glob("run-*.json"))
    assert "interrupted" in capsys.readouterr().err


def test_an_error_inside_the_block_restores_and_propagates(nvml):
    lim = GpuPowerLimit(open_gpus("nvidia"), 0)
    with pytest.raises(RuntimeError, match="boom"), applied([lim], 300) as state:
        assert nvml.limit_mw == 300_000 and state.read_back_w == {"gpu:0": 300.0}
        raise RuntimeError("boom")
    assert nvml.limit_mw == 700_000 and state.restored_w == {"gpu:0": 700.0} and not state.restore_failed


def test_sigterm_inside_the_block_unwinds_through_the_restore(nvml):
    lim = GpuPowerLimit(open_gpus("nvidia"), 0)
    with pytest.raises(Interrupted), applied([lim], 250):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert nvml.limit_mw == 700_000


def test_a_limit_that_cannot_be_restored_is_told_with_the_fix(nvml):
    lim = GpuPowerLimit(open_gpus("nvidia"), 0)
    told: list[str] = []
    nvml.fail_set_to = 700_000
    with applied([lim], 250, warn=told.append) as state:
        pass
    assert nvml.limit_mw == 250_000 and state.restore_failed == told and len(told) == 1
    assert "could not restore gpu:0's power limit to 700 W" in told[0]
    assert "sudo nvidia-smi -i 0 -pl 700" in told[0]


def test_the_meter_reads_back_the_cap_it_runs_under(nvml):
    meter = GpuMeter("nvidia", 0)
    with applied([GpuPowerLimit(meter.gpus, 0)], 400):
        meter.begin()
        time.sleep(0.1)
        m = meter.end()
    assert m.state_begin["gpu:0"]["power_limit_w"] == 400 and m.state_end["gpu:0"]["power_limit_w"] == 400
    assert m.average_power_w == pytest.approx(320, rel=0.05)


# ---------------------------------------------------------------------------------------------------------
# NVIDIA: refused before anything runs


def test_no_permission_is_refused_before_training(nvml, tmp_path, capsys):
    nvml.permitted = False
    out = tmp_path / "out"
    assert main(["run", *TINY, "--meter", "nvidia", "--power-limit", "250", "--out", str(out)]) == 2
    shown = capsys.readouterr()
    line = error_line(shown.err)
    assert "no permission" in line.lower() and "allowed range 200-700 W" in line
    assert "run as root" in line and "zeusd" in line and "ZEUSD_SOCK_PATH" in line
    assert "train" not in shown.out and "energy" not in nvml.log and nvml.sets == []
    assert not out.exists() or not list(out.glob("run-*.json"))


@pytest.mark.parametrize("caps", ["800", "250,150"])
def test_a_cap_outside_the_range_is_refused(nvml, tmp_path, capsys, caps):
    assert main(["run", *TINY, "--meter", "nvidia", "--power-limit", caps, "--out", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "outside the allowed range 200-700 W of gpu:0 (Fake H100" in line
    assert nvml.sets == []


def test_an_llm_run_is_refused_before_any_layer_is_built(nvml, tmp_path, capsys):
    nvml.permitted = False
    assert main(["run", *LAYER, "--meter", "nvidia", "--power-limit", "250", "--out", str(tmp_path)]) == 2
    assert "zeusd" in error_line(capsys.readouterr().err) and "energy" not in nvml.log


@pytest.mark.parametrize("caps, needle", [
    ("abc", "'abc' is not a number of watts"), ("-5", "must be a finite number of watts > 0"),
    ("nan", "must be a finite number"), ("250,250", "names a cap twice"), ("250000", "give watts, not mW"),
])
def test_bad_cap_values_are_one_line(tmp_path, capsys, caps, needle):
    assert main(["run", *TINY, "--power-limit", caps, "--out", str(tmp_path)]) == 2
    assert needle in error_line(capsys.readouterr().err)


def test_no_gpu_here_is_refused(tmp_path, capsys):
    assert main(["run", *TINY, "--meter", "estimate", "--power-limit", "250", "--out", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--power-limit: no GPU to cap" in line


def test_parallel_expert_refuses_caps(capsys):
    assert main(["run", *TINY, "--parallel", "expert", "--power-limit", "250"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "do not work with --parallel expert" in line and "no rank sets or restores for the others" in line


# ---------------------------------------------------------------------------------------------------------
# CPU packages through the powercap tree


def limit_files(zone: Path, limit_w: float = 28, max_w: float | None = 45) -> Path:
    """A package zone's constraints as a real tree states them: long_term (PL1) and short_term (PL2)."""
    (zone / "constraint_0_name").write_text("long_term\n")
    (zone / "constraint_0_power_limit_uw").write_text(f"{int(limit_w * 1e6)}\n")
    if max_w is not None:
        (zone / "constraint_0_max_power_uw").write_text(f"{int(max_w * 1e6)}\n")
    (zone / "constraint_1_name").write_text("short_term\n")
    (zone / "constraint_1_power_limit_uw").write_text("64000000\n")
    return zone / "constraint_0_power_limit_uw"


def test_a_run_refuses_several_cpu_caps_before_setting_any(live_rapl, tmp_path, capsys):
    pl1 = limit_files(live_rapl / "intel-rapl:0")
    cfg = tmp_path / "run.toml"
    cfg.write_text("cpu_power_limit = [25, 15]\n")
    assert main(["run", *TINY, "--meter", "rapl", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a run holds one CPU cap over all of it, not 2" in err and "sweep --cpu-power-limit 25,15" in err
    assert "Traceback" not in err and pl1.read_text() == "28000000\n"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.json"))


def test_cpu_cap_set_measured_and_restored(live_rapl, tmp_path, capsys):
    pl1 = limit_files(live_rapl / "intel-rapl:0")
    out = tmp_path / "out"
    assert main(["run", *TINY, "--meter", "rapl", "--cpu-power-limit", "15", "--out", str(out)]) == 0
    assert pl1.read_text() == "28000000\n"
    assert (live_rapl / "intel-rapl:0" / "constraint_1_power_limit_uw").read_text() == "64000000\n"  # PL2 untouched
    doc = one_doc(out)
    assert [m["name"] for m in doc["models"]] == ["moe[auto]", "dense_active"]  # one CPU cap: names unchanged
    for m in doc["models"]:
        assert m["cpu_power_limit_w"] == 15 and m["power_limit_w"] is None
        assert [w["cpu_power_limit_w"] for w in m["windows"]] == [15]
    cpu = doc["power_limits"]["cpu"]
    assert cpu["read_back_w"] == {"cpu:package-0": 15.0} and cpu["restored_w"] == {"cpu:package-0": 28.0}
    assert "CPU power cap (long-term RAPL limit) over the whole run: 15 W" in capsys.readouterr().out


def test_cpu_cap_restored_on_sigterm_and_error(tmp_path):
    zone = write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    pl1 = limit_files(zone)
    limits = cpu_limits(tmp_path)
    assert [(lim.device, lim.file) for lim in limits] == [("cpu:package-0", pl1)]
    with pytest.raises(Interrupted), applied(limits, 10):
        assert pl1.read_text() == "10000000\n"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert pl1.read_text() == "28000000\n"
    with pytest.raises(ValueError), applied(limits, 12):
        raise ValueError("a failed run")
    assert pl1.read_text() == "28000000\n"


def test_cpu_constraint_is_the_long_term_one(tmp_path):
    zone = write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (zone / "constraint_0_name").write_text("short_term\n")
    (zone / "constraint_0_power_limit_uw").write_text("64000000\n")
    (zone / "constraint_1_name").write_text("long_term\n")
    (zone / "constraint_1_power_limit_uw").write_text("28000000\n")
    write_zone(tmp_path, "intel-rapl:1", "psys", 0)  # the platform zone is not a package: never capped
    [lim] = cpu_limits(tmp_path)
    assert lim.file.name == "constraint_1_power_limit_uw" and lim.read_w() == 28
    assert lim.range_w() == (0.0, 1000.0)  # no stated maximum: a package's physical ceiling


def test_cpu_cap_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "nowhere"))
    assert main(["run", *TINY, "--cpu-power-limit", "15", "--out", str(tmp_path)]) == 2
    assert "--cpu-power-limit: no writable RAPL power limit here: no powercap tree at" in \
        error_line(capsys.readouterr().err)
    write_zone(tmp_path / "pc", "intel-rapl:0", "package-0", 0)  # a tree with no constraint at all
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "pc"))
    assert main(["run", *TINY, "--cpu-power-limit", "15", "--out", str(tmp_path)]) == 2
    assert "states a power limit" in error_line(capsys.readouterr().err)
    limit_files(tmp_path / "pc" / "intel-rapl:0")
    assert main(["run", *TINY, "--cpu-power-limit", "50", "--out", str(tmp_path)]) == 2
    assert "--cpu-power-limit 50 W is outside the allowed range 0-45 W of cpu:package-0" in \
        error_line(capsys.readouterr().err)
    assert (tmp_path / "pc" / "intel-rapl:0" / "constraint_0_power_limit_uw").read_text() == "28000000\n"


def _check_as_nobody(limits: list[RaplPowerLimit]) -> str:
    """check() in a forked child that dropped root: the kernel's own EACCES on the 0644 file."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            check(limits, [15])  # type: ignore[arg-type]
            msg = "allowed"
        except ConfigError as e:
            msg = str(e)
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            msg = f"error|{e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    got = b""
    while chunk := os.read(r, 4096):
        got += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return got.decode()


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs fork and root to drop")
def test_cpu_cap_without_root_is_refused():
    root = Path(tempfile.mkdtemp(prefix="moe-energy-pl-"))  # not under pytest's 0700 tmp: 'nobody' must reach it
    try:
        root.chmod(0o755)
        zone = write_zone(root, "intel-rapl:0", "package-0", 0)
        limit_files(zone)
        for f in [zone, *zone.iterdir()]:
            f.chmod(0o755 if f.is_dir() else 0o644)
        msg = _check_as_nobody(cpu_limits(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert msg.startswith("--cpu-power-limit: no permission to write") and "root" in msg and "\n" not in msg
    assert "allowed range 0-45 W" in msg


def test_power_caps_config_defaults():
    assert not PowerCaps().given and PowerCaps(cpu_w=(10.0,)).given


def test_a_set_the_probe_let_pass_is_still_one_line_and_nothing_is_left_set(nvml, tmp_path, capsys, monkeypatch):
    probe = nvml.set_limit

    def only_same_value(h, mw):  # a driver that lets a no-op write through without permission
        if mw != nvml.limit_mw:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        probe(h, mw)

    monkeypatch.setattr(pynvml, "nvmlDeviceSetPowerManagementLimit", only_same_value)
    assert main(["run", *TINY, "--meter", "nvidia", "--power-limit", "250", "--out", str(tmp_path)]) == 2
    shown = capsys.readouterr()
    line = error_line(shown.err)
    assert "could not set gpu:0's power limit to 250 W" in line and "zeusd" in line
    assert "train" not in shown.out and nvml.limit_mw == 700_000
