"""Carbon and cost per million inferences: the arithmetic, the labels, and `run` end to end (flags, --config,
environment, bad values)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICK, TINY_SHAPE, TINY_TASK, one_line_error

from moe_energy.cli import main
from moe_energy.config import CarbonPrice
from moe_energy.power.carbon import ESTIMATED, MEASURED, add_carbon, carbon_fields, per_million

TINY = [*TINY_SHAPE, *TINY_TASK, *QUICK, "--models", "moe,dense_active"]


def test_per_million_is_energy_times_the_figure():
    # 1,000 inferences/J: a million take 1,000 J = 1/3,600 kWh; at 400 g/kWh that is 0.111 g
    assert per_million(1000.0, 400.0) == pytest.approx(400 / 3600)
    assert per_million(1000.0, 0.15) == pytest.approx(0.15 / 3600)
    assert per_million(None, 400.0) is None and per_million(1000.0, None) is None and per_million(0.0, 1) is None


def test_records_gain_figures_labelled_with_their_basis():
    doc = {"models": [
        {"name": "moe", "inferences_per_joule": 2000.0, "energy_method": "counter", "energy_is_estimate": False},
        {"name": "dense", "inferences_per_joule": 500.0, "energy_method": "estimate", "energy_is_estimate": True},
        {"name": "big", "inferences_per_joule": None, "energy_method": "none", "status": "skipped"},
    ]}
    add_carbon(doc, CarbonPrice(400.0, 0.15))
    moe, dense, big = doc["models"]
    assert moe["co2e_g_per_million"] == pytest.approx(1e6 / 2000 / 3.6e6 * 400)
    assert moe["cost_per_million"] == pytest.approx(1e6 / 2000 / 3.6e6 * 0.15)
    assert (moe["carbon_basis"], dense["carbon_basis"]) == (MEASURED, ESTIMATED)
    assert dense["co2e_g_per_million"] == pytest.approx(4 * moe["co2e_g_per_million"])
    assert big["co2e_g_per_million"] is None and big["carbon_basis"] is None
    assert all(m["carbon_intensity_g_per_kwh"] == 400 and m["price_per_kwh"] == 0.15 for m in doc["models"])
    assert doc["carbon"]["per"] == "million inferences" and doc["carbon"]["label"].startswith("ESTIMATES")


def test_only_the_figure_given_is_computed_and_none_leaves_the_doc_alone():
    rec = {"inferences_per_joule": 100.0, "energy_method": "counter"}
    f = carbon_fields(rec, CarbonPrice(None, 0.2))
    assert f["co2e_g_per_million"] is None and f["cost_per_million"] == pytest.approx(1e4 / 3.6e6 * 0.2)
    doc = {"models": [dict(rec)]}
    assert add_carbon(doc, CarbonPrice()) == {"models": [rec]}


def test_llm_layers_are_per_million_tokens_and_the_extrapolation_too():
    rec = {"inferences_per_joule": 4000.0, "energy_method": "counter",
           "model_extrapolated": {"moe_layers": 10, "joules_per_1k_tokens": 2.5}}
    doc = add_carbon({"family": "llm_layer", "models": [rec]}, CarbonPrice(500.0, None))
    assert doc["carbon"]["per"] == "million tokens"
    assert rec["co2e_g_per_million"] == pytest.approx(1e6 / 4000 / 3.6e6 * 500)
    assert rec["model_extrapolated"]["co2e_g_per_million"] == pytest.approx(2500 / 3.6e6 * 500)  # 10x the layer's


def only_doc(out: Path) -> dict:
    [f] = list(out.glob("run-*.json"))
    return json.loads(f.read_text())


def test_run_shows_estimates_of_estimates_on_an_estimated_cpu(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", *TINY, "--meter", "estimate", "--carbon-intensity", "400", "--price-per-kwh", "0.15",
                 "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "CO2e" in shown and "(est. of" in shown  # the columns (rich folds their long cells)
    assert "carbon and cost per million inferences: ESTIMATES" in shown and "400 g CO2e/kWh and price 0.15" in shown
    doc = only_doc(out)
    for m in doc["models"]:
        assert m["carbon_basis"] == ESTIMATED and m["carbon_intensity_g_per_kwh"] == 400
        assert m["co2e_g_per_million"] == pytest.approx(1e6 / m["inferences_per_joule"] / 3.6e6 * 400)
        assert m["cost_per_million"] == pytest.approx(1e6 / m["inferences_per_joule"] / 3.6e6 * 0.15)


def test_measured_energy_gives_plain_estimates_and_the_environment_is_read(live_rapl, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setenv("MOE_ENERGY_CARBON_INTENSITY", "250")
    monkeypatch.setenv("MOE_ENERGY_PRICE_PER_KWH", "0.3")
    cfg = tmp_path / "c.toml"
    cfg.write_text("price_per_kwh = 0.1\n")  # the config file is above the environment
    out = tmp_path / "out"
    assert main(["run", *TINY, "--meter", "rapl", "--config", str(cfg), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "(est. of" not in shown and "(est.)" in shown and "the energy is measured" in shown
    doc = only_doc(out)
    assert doc["carbon"]["carbon_intensity_g_per_kwh"] == 250 and doc["carbon"]["price_per_kwh"] == 0.1
    assert all(m["carbon_basis"] == MEASURED and m["co2e_g_per_million"] > 0 for m in doc["models"])


def test_llm_layer_run_has_per_million_token_columns(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--arch", "custom", "--d-model", "32", "--ffn-dim", "16", "--experts", "4", "--top-k", "2",
                 "--tokens", "4", "--warmup", "0", "--device", "cpu", "--cooldown", "0", "--idle-seconds", "0",
                 "--repeats", "1", "--duration", "0.3", "--meter", "estimate", "--carbon-intensity", "400",
                 "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "CO2e" in shown and "cost/" not in shown and "carbon and cost per million tokens: ESTIMATES" in shown
    doc = only_doc(out)
    assert doc["carbon"]["per"] == "million tokens"
    assert all(m["co2e_g_per_million"] == pytest.approx(1e6 / m["tokens_per_joule"] / 3.6e6 * 400)
               for m in doc["models"] if m["status"] == "measured")


@pytest.mark.parametrize("argv, env, needle", [
    (["--carbon-intensity", "-5"], {}, "carbon_intensity=-5.0 must be a finite number >= 0"),
    (["--carbon-intensity", "nan"], {}, "carbon_intensity=nan"),
    (["--price-per-kwh", "cheap"], {}, "invalid float value: 'cheap'"),
    ([], {"MOE_ENERGY_PRICE_PER_KWH": "cheap"}, "MOE_ENERGY_PRICE_PER_KWH='cheap' is not a number"),
])
def test_bad_values_exit_2_with_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, argv, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["run", *TINY, *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr()
    lines = [ln for ln in err.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err.err
    assert "train" not in err.out and not list(tmp_path.glob("run-*.json"))


@pytest.mark.parametrize("toml, env, needle", [
    ("carbon_intensity = -5\n", {}, "carbon_intensity=-5 must be a finite number >= 0"),
    ('power_limit = "abc"\n', {}, "power_limit='abc': 'abc' is not a number of watts"),
    ("", {"MOE_ENERGY_PRICE_PER_KWH": "-1"}, "MOE_ENERGY_PRICE_PER_KWH=-1.0 must be a finite number >= 0"),
])
def test_plan_refuses_the_carbon_price_and_caps_run_would_refuse(tmp_path, monkeypatch, capsys, toml, env, needle):
    """plan checks a run's options: a --config (or environment) that `run` refuses was planned as fine."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    one_line_error(main(["plan", *TINY_SHAPE, *TINY_TASK, "--device", "cpu", "--config", str(cfg)]),
                   capsys.readouterr().err, needle)
