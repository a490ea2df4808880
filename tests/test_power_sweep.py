"""Sweeps under power caps, with carbon and cost (issue 15): the cap is a grid axis (part of each point's key),
checked against the hardware before any point runs, set around each point and restored whatever ends the
sweep; the carbon intensity and price price every stored record and are no part of any key. The NVIDIA path
runs Zeus's real device layer over the fake NVML of test_power_limit; the CPU path a fake powercap tree."""

from __future__ import annotations

import csv
import io
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import QUICK, TINY_SHAPE, TINY_TASK, error_line

pytest.importorskip("pynvml")
pytest.importorskip("zeus")

from test_power_limit import LAYER, CappableNVML, limit_files  # noqa: E402

from moe_energy.cli import main  # noqa: E402
from moe_energy.config import ConfigError, resolve_caps  # noqa: E402
from moe_energy.power.carbon import ESTIMATED, JOULES_PER_KWH  # noqa: E402
from moe_energy.runner import sweep as sw  # noqa: E402

SHAPE = [*TINY_SHAPE, *TINY_TASK, *QUICK, "--models", "moe,dense_active"]


@pytest.fixture
def nvml(monkeypatch):
    fake = CappableNVML()
    fake.install(monkeypatch)
    return fake


def rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------------------
# the grid


def _grid(**extra) -> sw.Grid:
    return sw.build_grid({"experts": "4", "hidden": "16,32", "layers": "2", "top_k": "2", "input_dim": 40,
                          "classes": 4, **extra})


def test_caps_are_an_axis_of_the_key_and_an_uncapped_key_is_unchanged():
    grid = _grid()
    capped = sw.with_caps(grid, [300.0, 250.0], [15.0])
    assert sw.with_caps(grid, [], []) is grid
    assert [(p.label, p.power_limit_w, p.cpu_power_limit_w) for p in capped.points] == [
        ("E4-H16-L2-k2", 300.0, 15.0), ("E4-H16-L2-k2", 250.0, 15.0),
        ("E4-H32-L2-k2", 300.0, 15.0), ("E4-H32-L2-k2", 250.0, 15.0)]  # caps innermost
    keys = [p.key("nvidia") for p in capped.points]
    assert len(set(keys)) == 4 and not set(keys) & {p.key("nvidia") for p in grid.points}
    plain = grid.points[0]
    assert "power_limit_w" not in plain.config("nvidia") and plain.caps_text == "-"
    assert capped.points[0].config("nvidia")["power_limit_w"] == 300.0
    assert capped.points[0].caps_text == "300 W, CPU 15 W"
    assert capped.source["power_limit_w"] == [300.0, 250.0] and capped.source["cpu_power_limit_w"] == [15.0]
    cpu_only = sw.with_caps(grid, [], [20.0])
    assert [p.power_limit_w for p in cpu_only.points] == [None, None]
    assert [p.caps_text for p in cpu_only.points] == ["CPU 20 W", "CPU 20 W"]


def test_cpu_caps_are_an_axis_too_but_one_device_at_a_time():
    grid = _grid()
    cpu = sw.with_caps(grid, [], [25.0, 15.0])
    assert [(p.spec.hidden, p.power_limit_w, p.cpu_power_limit_w) for p in cpu.points] == [
        (16, None, 25.0), (16, None, 15.0), (32, None, 25.0), (32, None, 15.0)]  # caps innermost, in the order given
    assert len({p.key("rapl") for p in cpu.points}) == 4
    assert cpu.source["cpu_power_limit_w"] == [25.0, 15.0] and cpu.source["power_limit_w"] is None
    for gpu in ("300", "sweep"):
        with pytest.raises(ConfigError, match="sweep one device's caps at a time"):
            resolve_caps({"power_limit": gpu, "cpu_power_limit": "25,15"})
    assert resolve_caps({"power_limit": "300,250", "cpu_power_limit": 15}).cpu_w == (15.0,)  # one CPU cap under each


# ---------------------------------------------------------------------------------------------------------
# NVIDIA: set around every point, read back, restored


@pytest.mark.slow
def test_a_two_cap_sweep_records_each_cap_read_back_and_restores(nvml, tmp_path, capsys):
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", "250,300", "--db", str(db)]) == 0
    assert nvml.limit_mw == 700_000
    # the probe writes the limit in force back; then each point's cap, each followed by the original
    assert nvml.sets == [700_000, 250_000, 700_000, 300_000, 700_000]
    got = rows(db, "SELECT name, power_limit_w, power_limit_requested_w FROM models ORDER BY id")
    assert got == [("moe[auto]", 250.0, 250.0), ("dense_active", 250.0, 250.0),
                   ("moe[auto]", 300.0, 300.0), ("dense_active", 300.0, 300.0)]
    assert sorted(r[0] for r in rows(db, "SELECT power_limit_w FROM windows")) == [250.0, 250.0, 300.0, 300.0]
    assert len({r[0] for r in rows(db, "SELECT point_key FROM points WHERE status = 'done'")}) == 2
    assert "measured 2, skipped 0, failed 0" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_works_per_cap(nvml, tmp_path, capsys):
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", "250", "--db", str(db)]) == 0
    nvml.sets.clear()
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", "250,300", "--db", str(db),
                 "--resume"]) == 0
    assert nvml.sets == [700_000, 300_000, 700_000]  # 250 W was complete: never set again
    assert "measured 1, skipped 0, failed 0, already complete 1" in capsys.readouterr().out
    assert sorted(r[0] for r in rows(db, "SELECT power_limit_requested_w FROM models")) == [250, 250, 300, 300]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_capped_sweep_restores_the_limit(nvml, tmp_path, capsys, sig, code):
    db = tmp_path / "s.db"
    nvml.signal_after = (sig, 2)  # the second power sample of the first capped window
    assert main(["sweep", *SHAPE, "--duration", "2", "--meter", "nvidia", "--power-limit", "250,300",
                 "--db", str(db)]) == code
    assert nvml.signal_after is None, "the signal was sent"
    assert nvml.limit_mw == 700_000 and nvml.sets == [700_000, 250_000, 700_000]  # 300 W never set
    assert rows(db, "SELECT COUNT(*) FROM points") == [(0,)]
    assert "interrupted" in capsys.readouterr().err


def test_a_failing_point_restores_and_the_sweep_goes_on(nvml, tmp_path, monkeypatch, capsys):
    import moe_energy.runner.core as core

    real = core.run
    calls = []

    def first_fails(*a, **k):
        calls.append(nvml.limit_mw)
        if len(calls) == 1:
            raise RuntimeError("boom in the first point")
        return real(*a, **k)

    monkeypatch.setattr(core, "run", first_fails)
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", "250,300", "--db", str(db)]) == 1
    assert calls == [250_000, 300_000] and nvml.limit_mw == 700_000
    assert rows(db, "SELECT status FROM points ORDER BY id") == [("failed",), ("done",)]


@pytest.mark.parametrize("caps, needle", [("100", "outside the allowed range 200-700 W"),
                                          ("250,800", "--power-limit 800 W is outside")])
def test_a_cap_the_gpu_refuses_is_one_line_before_any_point(nvml, tmp_path, capsys, caps, needle):
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", caps, "--db", str(db)]) == 2
    assert needle in error_line(capsys.readouterr().err)
    assert not db.exists() and nvml.sets == [] and nvml.limit_mw == 700_000


def test_no_permission_is_one_line_before_any_point(nvml, tmp_path, capsys):
    nvml.permitted = False
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", "250", "--db", str(db)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "no permission" in line and "zeusd" in line and not db.exists()


def test_no_gpu_is_one_line(tmp_path, capsys):
    assert main(["sweep", *SHAPE, "--meter", "estimate", "--power-limit", "250", "--db",
                 str(tmp_path / "s.db")]) == 2
    assert "no GPU to cap" in error_line(capsys.readouterr().err)


def test_power_limit_sweep_and_dry_run_list_every_cap(nvml, tmp_path, capsys):
    nvml.range_mw, nvml.limit_mw = (250_000, 300_000), 300_000
    assert main(["sweep", *SHAPE, "--meter", "nvidia", "--power-limit", "sweep", "--dry-run",
                 "--db", str(tmp_path / "s.db")]) == 0
    out = capsys.readouterr().out
    assert "sweep points (3)" in out and all(f"{w} W" in out for w in (300, 275, 250))
    assert nvml.limit_mw == 300_000


@pytest.mark.slow
def test_llm_layer_points_under_two_caps(nvml, tmp_path):
    db = tmp_path / "s.db"
    assert main(["sweep", *LAYER, "--meter", "nvidia", "--power-limit", "300,250", "--db", str(db)]) == 0
    got = rows(db, "SELECT name, tokens_per_forward, power_limit_w, power_limit_requested_w FROM models ORDER BY id")
    assert got == [("moe[auto]@T=4", 4, 300.0, 300.0), ("dense_total@T=4", 4, 300.0, 300.0),
                   ("moe[auto]@T=4", 4, 250.0, 250.0), ("dense_total@T=4", 4, 250.0, 250.0)]
    assert nvml.limit_mw == 700_000


@pytest.mark.slow
def test_caps_and_carbon_from_the_sweep_config(nvml, tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text("power_limit = [250, 300]\ncarbon_intensity = 400\n[sweep]\nexperts = [4]\n")
    db = tmp_path / "s.db"
    args = [a for a in SHAPE]
    i = args.index("--experts")
    del args[i:i + 2]
    assert main(["sweep", *args, "--config", str(cfg), "--meter", "nvidia", "--db", str(db)]) == 0
    got = rows(db, "SELECT power_limit_requested_w, carbon_intensity_g_per_kwh FROM models ORDER BY id")
    assert got == [(250.0, 400.0), (250.0, 400.0), (300.0, 400.0), (300.0, 400.0)]


# ---------------------------------------------------------------------------------------------------------
# CPU: the powercap tree


def test_a_cpu_capped_sweep_sets_and_restores_pl1(live_rapl, tmp_path):
    pl1 = limit_files(live_rapl / "intel-rapl:0")
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "rapl", "--cpu-power-limit", "15", "--db", str(db)]) == 0
    assert pl1.read_text() == "28000000\n"
    got = rows(db, "SELECT name, cpu_power_limit_w, power_limit_w FROM models ORDER BY id")
    assert got == [("moe[auto]", 15.0, None), ("dense_active", 15.0, None)]
    [(config,)] = rows(db, "SELECT config_json FROM points")
    assert '"cpu_power_limit_w":15.0' in config.replace(" ", "")


@pytest.mark.slow
def test_a_sweep_of_two_cpu_caps_measures_each_and_restores_pl1(live_rapl, tmp_path):
    pl1 = limit_files(live_rapl / "intel-rapl:0")
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "rapl", "--cpu-power-limit", "25,15", "--db", str(db)]) == 0
    assert pl1.read_text() == "28000000\n"
    got = rows(db, "SELECT name, cpu_power_limit_w FROM models ORDER BY id")  # the cap read back
    assert got == [("moe[auto]", 25.0), ("dense_active", 25.0), ("moe[auto]", 15.0), ("dense_active", 15.0)]
    assert len({k for (k,) in rows(db, "SELECT point_key FROM points")}) == 2
    assert main(["sweep", *SHAPE, "--meter", "rapl", "--cpu-power-limit", "25,15", "--db", str(db), "--resume"]) == 0
    assert rows(db, "SELECT COUNT(*) FROM points") == [(2,)]  # resume works per CPU cap
    from moe_energy.report.analysis import best_caps, caps, load
    from moe_energy.storage.store import Store

    with Store(db, create=False) as st:
        frame = load(st)
    assert caps(frame) == [15.0, 25.0]  # the report's cap axis is the CPU's
    assert {b.model for b in best_caps(frame)} == {"moe[auto]", "dense_active"}


def test_several_cpu_caps_beside_gpu_caps_are_one_line(nvml, live_rapl, tmp_path, capsys):
    limit_files(live_rapl / "intel-rapl:0")
    assert main(["sweep", *SHAPE, "--meter", "rapl", "--power-limit", "250", "--cpu-power-limit", "25,15",
                 "--db", str(tmp_path / "s.db")]) == 2
    assert "sweep one device's caps at a time" in error_line(capsys.readouterr().err)


def test_a_cpu_cap_without_a_writable_tree_is_one_line(tmp_path, monkeypatch, capsys):
    from moe_energy.energy.rapl import ENV_ROOT

    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "absent"))
    assert main(["sweep", *SHAPE, "--meter", "estimate", "--cpu-power-limit", "15", "--db",
                 str(tmp_path / "s.db")]) == 2
    assert "--cpu-power-limit: no writable RAPL power limit here" in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------
# carbon and cost on every stored record


def test_carbon_and_cost_on_every_record_not_in_the_key_and_exported(tmp_path, monkeypatch, capsys):
    db = tmp_path / "s.db"
    monkeypatch.setenv("MOE_ENERGY_PRICE_PER_KWH", "0.15")
    assert main(["sweep", *SHAPE, "--meter", "estimate", "--carbon-intensity", "400", "--db", str(db)]) == 0
    got = rows(db, "SELECT inferences_per_joule, co2e_g_per_million, cost_per_million, carbon_intensity_g_per_kwh, "
                   "price_per_kwh, carbon_basis FROM models")
    assert len(got) == 2
    for ipj, co2e, cost, ci, price, basis in got:
        kwh = 1e6 / ipj / JOULES_PER_KWH
        assert co2e == pytest.approx(kwh * 400) and cost == pytest.approx(kwh * 0.15)
        assert (ci, price, basis) == (400.0, 0.15, ESTIMATED)  # the CPU-TDP estimate: an estimate of an estimate
    capsys.readouterr()
    # the same point without carbon figures is the same point: --resume finds it complete
    monkeypatch.delenv("MOE_ENERGY_PRICE_PER_KWH")
    assert main(["sweep", *SHAPE, "--meter", "estimate", "--db", str(db), "--resume"]) == 0
    assert "already complete 1" in capsys.readouterr().out
    assert main(["export", "--db", str(db)]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 2 and all(float(r["co2e_g_per_million"]) > 0 and r["price_per_kwh"] == "0.15"
                                   and r["carbon_basis"] == ESTIMATED for r in table)


@pytest.mark.parametrize("flag, value, needle", [("--carbon-intensity", "-1", "must be a finite number >= 0"),
                                                 ("--carbon-intensity", "90000", "above any grid"),
                                                 ("--price-per-kwh", "nan", "must be a finite number >= 0")])
def test_bad_carbon_figures_are_one_line(tmp_path, capsys, flag, value, needle):
    db = tmp_path / "s.db"
    assert main(["sweep", *SHAPE, "--meter", "estimate", flag, value, "--db", str(db)]) == 2
    assert needle in error_line(capsys.readouterr().err) and not db.exists()
