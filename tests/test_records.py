"""The window and model records: declared once, built in one module, the fields the store keeps are theirs."""

from __future__ import annotations

import pytest

from moe_energy.energy.idle import IdlePower
from moe_energy.energy.meter import Measurement
from moe_energy.measure.records import (
    MEDIAN_KEYS,
    SPREAD_KEYS,
    LayerRecord,
    ModelRecord,
    WholeRecord,
    WindowRecord,
    failed_window,
    measured_record,
    skipped_record,
    window_record,
)
from moe_energy.measure.window import BenchResult
from moe_energy.storage.store import (
    CARBON_MODEL_COLUMNS,
    LAYER_MODEL_COLUMNS,
    MODEL_COLUMNS,
    WEIGHTS_MODEL_COLUMNS,
    WHOLE_MODEL_COLUMNS,
    WINDOW_COLUMNS,
)
from moe_energy.train import TrainResult

BOOKKEEPING = {"repeat", "order", "started_utc", "failed"}  # set by whoever schedules the window


def _window(joules: float | None, seconds: float = 2.0, batches: int = 10) -> WindowRecord:
    m = Measurement(seconds=seconds, method="counter", meter="fake",
                    joules_by_device=None if joules is None else {"gpu:0": joules}, devices_covered=["gpu:0"])
    idle = IdlePower(seconds=1.0, method="counter", power_by_device_w={"gpu:0": 1.0})
    return window_record(BenchResult(4, batches, seconds, 100, [1.0, 2.0, 3.0], m, [], idle))


def test_a_window_record_holds_exactly_the_declared_fields():
    w = _window(20.0)
    assert set(w) == set(WindowRecord.__annotations__) - BOOKKEEPING
    assert w["inferences"] == 40 and w["inferences_per_joule"] == pytest.approx(2.0)
    assert w["dynamic_energy_j"] == pytest.approx(18.0)  # 20 J minus 1 W x 2 s
    assert set(failed_window("gone", 4, 100, "fake")) <= set(WindowRecord.__annotations__)


def test_model_records_use_only_declared_fields():
    fields = {"kind": "moe", "params": 10, "active_params": 5, "flops_per_inference": 100, "width": 3}
    windows = [{**_window(j), "repeat": r} for r, j in enumerate((10.0, 20.0, 40.0))]
    rec = measured_record("moe[grouped]", fields, "grouped", "float32", TrainResult(test_accuracy=0.5), 0.5, None,
                          windows)
    declared = set(ModelRecord.__annotations__)
    assert set(rec) <= declared, set(rec) - declared
    assert rec["inferences_per_joule"] == pytest.approx(2.0) and rec["energy_j_max"] == pytest.approx(40.0)
    assert rec["average_power_w_min"] == pytest.approx(5.0) and rec["average_power_w_max"] == pytest.approx(20.0)
    assert set(skipped_record("dense_total", fields, None, "float32", "out of memory")) <= declared
    assert set(MEDIAN_KEYS) | {f"{k}_{e}" for k in SPREAD_KEYS for e in ("min", "max")} <= declared


def test_every_store_column_is_a_record_field():
    """A model column is a ModelRecord field, or, for the LLM-layer columns only, one of LayerRecord's (which
    extends ModelRecord: the per-token figures, the routing's load, the roofline split)."""
    model = set(ModelRecord.__annotations__)
    layer = set(LayerRecord.__annotations__)
    whole = set(WholeRecord.__annotations__)
    assert set(LAYER_MODEL_COLUMNS) <= model | layer, set(LAYER_MODEL_COLUMNS) - model - layer
    assert set(WHOLE_MODEL_COLUMNS) <= model | whole, set(WHOLE_MODEL_COLUMNS) - model - whole
    assert set(WEIGHTS_MODEL_COLUMNS) <= layer, set(WEIGHTS_MODEL_COLUMNS) - layer  # issue 24: int8 layers
    rest = set(MODEL_COLUMNS) - set(LAYER_MODEL_COLUMNS) - set(WHOLE_MODEL_COLUMNS) - set(WEIGHTS_MODEL_COLUMNS)
    assert rest <= model, rest - model
    assert set(WINDOW_COLUMNS) <= set(WindowRecord.__annotations__)
    # issue 15's power-cap and carbon/cost fields are stored as declared, on the model and on the window
    assert set(CARBON_MODEL_COLUMNS) <= set(MODEL_COLUMNS) and "power_limit_w" in WINDOW_COLUMNS
    assert {"power_limit_w", "cpu_power_limit_w", "carbon_intensity_g_per_kwh", "price_per_kwh", "co2e_g_per_million",
            "cost_per_million", "carbon_basis"} <= set(CARBON_MODEL_COLUMNS) <= model


def test_a_window_with_dynamic_energy_at_or_below_zero_is_said_so_not_called_unmeasured():
    # idle 1 W over 2 s windows: 20 and 10 J leave 18 and 8 J of dynamic energy; 1.5 and 2 J leave -0.5 and 0 J,
    # measured, but the idle reading is at or above their draw, so they give no dynamic inferences/J
    windows = [_window(j) for j in (20.0, 1.5, 2.0, 10.0)]
    rec = measured_record("dense_total", {"kind": "dense"}, None, "float32", None, None, None, windows)
    assert rec["dynamic_inferences_per_joule"] == pytest.approx((40 / 18 + 40 / 8) / 2)
    assert rec["inferences_per_joule"] == pytest.approx((40 / 10 + 40 / 2) / 2)  # every raw figure measured
    dyn = [f for f in rec["flags"] if f.startswith("dynamic_inferences_per_joule:")]
    assert dyn == ["dynamic_inferences_per_joule: 2 of 4 windows had dynamic energy <= 0 (idle reading at or above "
                   "the window's draw); the median of the other 2"]
    assert not any("not measured" in f for f in rec["flags"]), rec["flags"]
    assert [w["dynamic_energy_j"] <= 0 for w in windows] == [False, True, True, False]
    for w in windows[1:3]:  # each such window says the same
        assert "dynamic energy <= 0 (idle reading at or above the window's draw)" in w["flags"]


def test_a_raw_zero_joule_window_and_an_unmeasured_one_are_told_apart():
    windows = [_window(20.0), _window(0.0), _window(None)]  # a counter that did not advance; a meter that read nothing
    rec = measured_record("dense_total", {"kind": "dense"}, None, "float32", None, None, None, windows)
    assert rec["inferences_per_joule"] == pytest.approx(2.0)
    raw = [f for f in rec["flags"] if f.startswith("inferences_per_joule:")]
    assert raw == ["inferences_per_joule: 1 of 3 windows had energy <= 0 (the counter did not "
                   "advance); 1 of 3 windows not measured; the median of the other 1"]
