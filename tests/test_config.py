"""Presets, overrides, TOML configs, and the one-line errors for bad values."""

import math

import pytest

from moe_energy.config import PRESETS, ConfigError, ModelSpec, RunOptions, load_toml, resolve_spec


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
