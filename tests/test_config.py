"""Presets, overrides, TOML configs, and the one-line errors for bad values."""

import math

import pytest

from moe_energy.config import PRESETS, ConfigError, ModelSpec, RunOptions, load_toml, resolve_config, resolve_spec
from moe_energy.models.strategies import STRATEGIES


def test_presets_are_the_seeds():
    assert PRESETS["small"] == ModelSpec(8, 256, 3, 2)
    assert PRESETS["large"] == ModelSpec(16, 1024, 4, 4)
    assert PRESETS["xl"] == ModelSpec(20, 2048, 5, 5)
    assert PRESETS["xxl"] == ModelSpec(32, 4096, 6, 8)


def test_resolve_overrides_preset_fields():
    s = resolve_spec("large", top_k=2, hidden=None)
    assert (s.experts, s.hidden, s.layers, s.top_k) == (16, 1024, 4, 2)
    assert resolve_spec(None) == PRESETS["small"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"top_k": 9}, "top_k=9 exceeds experts=8"),
        ({"hidden": 0}, "hidden=0 must be a positive integer"),
        ({"experts": -3}, "experts=-3"),
        ({"layers": 2.5}, "layers=2.5 is not a whole number"),
        ({"classes": 1}, "classes=1 must be at least 2"),
        ({"hidden": 10**9, "experts": 10**6}, "more than"),
    ],
)
def test_bad_shapes_raise_one_line(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        resolve_spec("small", **kwargs)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset='tiny' is unknown; choose one of small, large, xl, xxl"):
        resolve_spec("tiny")


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 0), ("duration", 0.0), ("duration", -1.0), ("duration", math.inf), ("lr", math.nan),
     ("epochs", -1), ("device", "tpu"), ("dtype", "int8"), ("strategies", ("fastest",)), ("models", ("big",))],
)
def test_bad_run_options(field, value):
    with pytest.raises(ConfigError) as e:
        RunOptions(**{field: value}).validate()
    assert "\n" not in str(e.value)


def test_a_model_or_strategy_named_twice_is_run_once():
    """As --tokens and --batch: each once, order kept (before, `--models moe,moe` trained and measured the MoE twice
    and saved two rows of one name)."""
    _, opts = resolve_config({"models": "moe,dense_total,moe", "strategies": ("grouped", "padded", "grouped")})
    assert opts.models == ("moe", "dense_total") and opts.strategies == ("grouped", "padded")
    assert resolve_config({"strategies": "all,all"})[1].strategies == tuple(STRATEGIES)


def test_toml_config_roundtrip_and_unknown_keys(tmp_path):
    good = tmp_path / "ok.toml"
    good.write_text('preset = "large"\ntop_k = 2\nduration = 3.5\nstrategies = ["grouped", "padded"]\n')
    cfg = load_toml(good)
    assert cfg == {"preset": "large", "top_k": 2, "duration": 3.5, "strategies": ("grouped", "padded")}
    bad = tmp_path / "bad.toml"
    bad.write_text("expertz = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['expertz'\]"):
        load_toml(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("experts = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(tmp_path / "missing.toml")


# -- power caps, carbon intensity and price (issue 15) -----------------------------------------------------
from moe_energy.config import CarbonPrice, PowerCaps, resolve_caps, resolve_carbon  # noqa: E402


@pytest.mark.parametrize("value, caps", [
    ("250,300", PowerCaps(gpu_w=(250.0, 300.0))), (" sweep ", PowerCaps(gpu_sweep=True)),
    (250, PowerCaps(gpu_w=(250.0,))), ([300, 262.5], PowerCaps(gpu_w=(300.0, 262.5))),
])
def test_power_limit_from_a_flag_or_a_config_value(value, caps):
    assert resolve_caps({"power_limit": value}) == caps
    assert resolve_caps({"cpu_power_limit": 15}) == PowerCaps(cpu_w=(15.0,))
    assert resolve_caps({"cpu_power_limit": "25,15"}) == PowerCaps(cpu_w=(25.0, 15.0))
    assert resolve_caps({}) == PowerCaps() and not PowerCaps().given


@pytest.mark.parametrize("cfg, needle", [
    ({"power_limit": "250,x"}, "'x' is not a number of watts"),
    ({"power_limit": ""}, "is empty"),
    ({"power_limit": [250, True]}, "power_limit=True must be a finite number of watts > 0"),
    ({"power_limit": [0]}, "> 0"),
    ({"power_limit": "300,300"}, "names a cap twice"),
    ({"cpu_power_limit": "15,x"}, "cpu_power_limit='15,x': 'x' is not a number of watts; give W[,W...]"),
    ({"power_limit": 7e5}, "give watts, not mW"),
    ({"cpu_power_limit": -1}, "cpu_power_limit=-1"),
    ({"cpu_power_limit": "15,15"}, "cpu_power_limit='15,15' names a cap twice"),
])
def test_bad_caps_are_one_line(cfg, needle):
    with pytest.raises(ConfigError) as e:
        resolve_caps(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


ENV = {"MOE_ENERGY_CARBON_INTENSITY": "300", "MOE_ENERGY_PRICE_PER_KWH": "0.2"}


def test_carbon_and_price_precedence_environment_below_settings():
    assert resolve_carbon({}, {}) == CarbonPrice() and not CarbonPrice().given
    assert resolve_carbon({}, ENV) == CarbonPrice(300.0, 0.2)
    assert resolve_carbon({"carbon_intensity": 400}, ENV) == CarbonPrice(400.0, 0.2)  # --config or flag wins
    assert resolve_carbon({"price_per_kwh": 0}, {}) == CarbonPrice(None, 0.0)  # free power is a price
    assert resolve_carbon({}, {"MOE_ENERGY_CARBON_INTENSITY": "  "}) == CarbonPrice()  # set but empty: unset


@pytest.mark.parametrize("cfg, env, needle", [
    ({"carbon_intensity": -1}, {}, "carbon_intensity=-1 must be a finite number >= 0"),
    ({"carbon_intensity": math.nan}, {}, "carbon_intensity=nan"),
    ({"price_per_kwh": math.inf}, {}, "price_per_kwh=inf"),
    ({"price_per_kwh": "0.15"}, {}, "price_per_kwh='0.15' must be a finite number"),  # a TOML string
    ({"carbon_intensity": 400_000}, {}, "give grams per kWh"),
    ({}, {"MOE_ENERGY_CARBON_INTENSITY": "lots"}, "MOE_ENERGY_CARBON_INTENSITY='lots' is not a number"),
    ({}, {"MOE_ENERGY_PRICE_PER_KWH": "-0.1"}, "MOE_ENERGY_PRICE_PER_KWH=-0.1 must be"),
    ({}, {"MOE_ENERGY_PRICE_PER_KWH": "nan"}, "MOE_ENERGY_PRICE_PER_KWH=nan must be"),
])
def test_bad_carbon_or_price_is_one_line(cfg, env, needle):
    with pytest.raises(ConfigError) as e:
        resolve_carbon(cfg, env)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_run_config_file_takes_the_new_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('carbon_intensity = 350\nprice_per_kwh = 0.3\npower_limit = [250, 300]\ncpu_power_limit = 20\n')
    doc = load_toml(cfg)
    assert resolve_carbon(doc, {}) == CarbonPrice(350.0, 0.3)
    assert resolve_caps(doc) == PowerCaps(gpu_w=(250.0, 300.0), cpu_w=(20.0,))
