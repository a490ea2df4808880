"""Fuzzed --config files: every generated config either loads (exit 0) or fails with exit 2, never a traceback."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_energy.cli import main
from moe_energy.config import CONFIG_KEYS


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["small", "xl", "cpu", "cuda", "float32", "bfloat16", "grouped", "moe", "", "x"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=8),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))
keys = st.one_of(st.sampled_from(sorted(CONFIG_KEYS - {"data", "out"})),
                 st.from_regex(r"[a-z_]{1,10}", fullmatch=True))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=st.dictionaries(keys, values, max_size=6))
def test_any_config_loads_or_exits_2(cfg, tmp_path, capsys):
    p = tmp_path / "fuzz.toml"
    p.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.items()), encoding="utf-8")
    code = main(["plan", "--config", str(p), "--device", "cpu"])
    out = capsys.readouterr()
    assert code in (0, 2), (cfg, out.err)
    if code == 2:
        assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert "Traceback" not in out.err
