"""End to end through the CLI: RAPL-measured runs on a live fake tree, labelled estimates, `moe-energy meters`."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SHAPE, TINY_TASK

from moe_energy.cli import main
from moe_energy.energy.rapl import DEFAULT_ROOT, ENV_ROOT

TINY = [*TINY_SHAPE, *TINY_TASK, "--samples", "300", "--epochs", "1", "--warmup", "0", "--device", "cpu",
        "--models", "moe,dense_active", "--cooldown", "0"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != ENV_ROOT}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "moe_energy", *args], capture_output=True, text=True,
                          timeout=300, env=e)




def only_json(out: Path) -> dict:
    [f] = list(out.glob("run-*.json"))
    return json.loads(f.read_text())


@pytest.mark.slow
def test_run_with_live_fake_rapl_records_measured_joules(live_rapl, tmp_path):
    out = tmp_path / "out"
    # 1 s windows and idle reading, as test_api's: the fake's writer (a process of its own) can lag a loaded 2-core
    # host by tens of ms at either edge, which a 0.4 s window read as over 10 % once in CI; 0.6 s left only 60 ms
    r = cli("run", *TINY, "--duration", "1", "--repeats", "2", "--idle-seconds", "1", "--out", str(out),
            env={ENV_ROOT: str(live_rapl)})
    assert r.returncode == 0, r.stderr
    doc = only_json(out)
    assert doc["energy_meter"]["name"] == "rapl" and doc["energy_meter"]["method"] == "counter"
    assert doc["energy_meter"]["devices"] == ["cpu:package-0"]
    assert doc["idle"]["power_w"] == pytest.approx(40.0, rel=0.10)
    assert [m["kind"] for m in doc["models"]] == ["moe", "dense"]
    for m in doc["models"]:
        assert m["energy_method"] == "counter" and m["energy_is_estimate"] is False
        assert m["repeats"] == 2 and len(m["windows"]) == 2
        assert m["idle_power_w"] == pytest.approx(40.0, rel=0.10)
        assert m["inferences_per_joule_min"] <= m["inferences_per_joule"] <= m["inferences_per_joule_max"]
        assert m["inferences_per_second_min"] <= m["inferences_per_second"] <= m["inferences_per_second_max"]
        for w in m["windows"]:
            assert w["energy_by_device_j"]["cpu:package-0"] == pytest.approx(40.0 * w["window_s"], rel=0.10)
            assert w["inferences_per_joule"] == pytest.approx(w["inferences"] / w["energy_j"])
            # the fake draws 40 W busy or idle, so nothing is dynamic: raw minus idle is near zero
            assert w["dynamic_energy_j"] is not None and abs(w["dynamic_energy_j"]) < 0.1 * w["energy_j"]
            pts = w["trace"]["cpu:package-0"]
            # single 0.1 s samples jitter with the fake writer's scheduling on a busy host; their median does not
            assert len(pts) >= 3 and statistics.median(p[1] for p in pts) == pytest.approx(40.0, rel=0.25)
            assert w["trace_energy_j"]["cpu:package-0"] == pytest.approx(w["energy_j"], rel=0.10)
            assert not any("shorter than" in f for f in w["flags"])  # 1 s is long enough to trust
    assert "rapl (counter)" in r.stdout and "(estimate)" not in r.stdout
    assert "idle power: " in r.stdout and " W (counter) over " in r.stdout  # idle power names its method too


@pytest.mark.slow
def test_run_with_estimate_labels_every_figure(tmp_path):
    out = tmp_path / "out"
    r = cli("run", *TINY, "--duration", "0.3", "--repeats", "1", "--idle-seconds", "0", "--meter", "estimate",
            "--cpu-tdp-watts", "30", "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = only_json(out)
    assert doc["energy_meter"]["name"] == "estimate" and doc["energy_meter"]["tdp_watts"] == 30
    for m in doc["models"]:
        assert m["energy_method"] == "estimate" and m["energy_is_estimate"] is True
        assert m["energy_devices"] == ["cpu:estimate"]
        assert m["inferences_per_joule"] is not None
        assert all(w["energy_method"] == "estimate" for w in m["windows"])
        assert all(any("shorter than 1 s" in f for f in w["flags"]) for w in m["windows"])  # 0.3 s: flagged
    assert r.stdout.count("(estimate)") >= 2 * len(doc["models"])  # inferences/J and W of every row
    assert "ESTIMATE, not a measurement" in r.stdout


@pytest.mark.slow
def test_auto_without_counters_falls_back_to_the_estimate_with_a_notice(tmp_path):
    out = tmp_path / "out"
    r = cli("run", *TINY, "--models", "dense_active", "--duration", "0.2", "--repeats", "1", "--idle-seconds", "0",
            "--out", str(out), env={ENV_ROOT: str(tmp_path / "no-powercap")})
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "ESTIMATE" in notices[0] and "no powercap tree" in notices[0]
    assert only_json(out)["models"][0]["energy_method"] == "estimate"


def test_meter_rapl_when_absent_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-powercap"))
    assert main(["run", *TINY, "--meter", "rapl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--meter rapl" in err and "no powercap tree" in err


@pytest.mark.slow
def test_meters_lists_rapl_unavailable_on_this_machine():
    zone = Path(DEFAULT_ROOT) / "intel-rapl:0" / "energy_uj"
    if zone.exists() and os.access(zone, os.R_OK):
        pytest.skip("this host exposes readable RAPL")
    r = cli("meters")
    assert r.returncode == 0, r.stderr
    [row] = [line for line in r.stdout.splitlines() if "│ rapl" in line]
    assert "no (" in row
    assert ("no powercap tree" in r.stdout) or ("no permission" in r.stdout)
    assert "estimate" in r.stdout and "--meter auto picks" in r.stdout


@pytest.mark.slow
def test_meters_sees_a_fake_tree(live_rapl):
    r = cli("meters", env={ENV_ROOT: str(live_rapl)})
    assert r.returncode == 0, r.stderr
    [row] = [line for line in r.stdout.splitlines() if "│ rapl" in line]
    assert "yes" in row and "cpu:package-0" in row
    assert "--meter auto picks: rapl (counter)" in r.stdout
