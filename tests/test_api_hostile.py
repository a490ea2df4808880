"""The public API at its edges: wrong kinds and wrong values are one-line TypeError/ValueError naming the
argument (never a ZeroDivisionError, AttributeError or torch internals), empty batches give [0, out] on every
strategy, and benchmark() takes any callable."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import raises_one_line
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import moe_energy as me
from moe_energy.config import ConfigError
from moe_energy.models.strategies import STRATEGIES, capacity_for

GOOD = {"experts": 4, "hidden": 16, "layers": 2, "top_k": 2, "input_dim": 12, "classes": 3}
SHAPE = ("experts", "hidden", "layers", "top_k", "input_dim", "classes")


# --- MoE(...) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", SHAPE)
@pytest.mark.parametrize("bad", [1.5, 2.0, True, False, "4", None, [4], torch.tensor(4.0)])
def test_moe_shape_of_a_wrong_kind_is_a_type_error(field, bad):
    raises_one_line(TypeError, lambda: me.MoE(**{**GOOD, field: bad}), f"{field}=", "whole number")


@pytest.mark.parametrize("field", SHAPE)
@pytest.mark.parametrize("bad", [0, -1, -(2**40)])
def test_moe_shape_below_one_is_a_value_error(field, bad):
    raises_one_line(ValueError, lambda: me.MoE(**{**GOOD, field: bad}), f"{field}={bad}", ">= 1")


@pytest.mark.parametrize(("experts", "top_k"), [(4, 5), (1, 2), (3, 100)])
def test_moe_top_k_above_experts_is_a_value_error(experts, top_k):
    raises_one_line(ValueError, lambda: me.MoE(**{**GOOD, "experts": experts, "top_k": top_k}), f"top_k={top_k}",
             f"experts={experts}")


def test_moe_accepts_integer_kinds_and_stores_plain_ints():
    m = me.MoE(**{k: np.int64(v) for k, v in GOOD.items()}, capacity_factor=np.float32(1.5))
    assert all(type(getattr(m, k)) is int and getattr(m, k) == v for k, v in GOOD.items())
    assert type(m.capacity_factor) is float and m.capacity_factor == 1.5
    assert me.MoE(**{**GOOD, "experts": 1, "top_k": 1, "classes": 1})(torch.randn(3, 12)).shape == (3, 1)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_moe_capacity_factor_must_be_finite_and_positive(bad):
    raises_one_line(ValueError, lambda: me.MoE(**GOOD, capacity_factor=bad), "capacity_factor=", "finite number > 0")
    m = me.MoE(**GOOD)
    raises_one_line(ValueError, lambda: setattr(m, "capacity_factor", bad), "capacity_factor=")
    assert m.capacity_factor == 1.25  # a refused value leaves the old one


@pytest.mark.parametrize("bad", ["1.25", True, None, [1.0]])
def test_moe_capacity_factor_of_a_wrong_kind_is_a_type_error(bad):
    raises_one_line(TypeError, lambda: me.MoE(**GOOD, capacity_factor=bad), "capacity_factor=")


@pytest.mark.parametrize("bad", ["fastest", "", "Grouped", "grouped "])
def test_moe_unknown_strategy_lists_the_known_ones(bad):
    msg = str(raises_one_line(ValueError, lambda: me.MoE(**GOOD, strategy=bad), "strategy=", "unknown strategy"))
    assert all(name in msg for name in STRATEGIES)
    m = me.MoE(**GOOD)
    raises_one_line(ValueError, lambda: setattr(m, "strategy", bad), "strategy=")
    assert m.strategy == "grouped"


@pytest.mark.parametrize("bad", [3, None, ["grouped"], b"grouped"])
def test_moe_strategy_of_a_wrong_kind_is_a_type_error(bad):
    assert "grouped_fm" in str(raises_one_line(TypeError, lambda: me.MoE(**GOOD, strategy=bad), "strategy="))


@pytest.mark.parametrize(("x", "exc"), [(torch.randn(2, 3, 12), ValueError), (torch.randn(5, 11), ValueError),
                                        (torch.randn(12), ValueError), ([[0.0] * 12], TypeError),
                                        (np.zeros((2, 12), dtype=np.float32), TypeError)])
def test_moe_input_of_the_wrong_shape_or_kind_says_what_it_needs(x, exc):
    m = me.MoE(**GOOD)
    raises_one_line(exc, lambda: m(x), "input x", "input_dim=12")


# --- empty batches --------------------------------------------------------------------------------


class _Ops(TorchDispatchMode):
    """Every aten op run inside (the same detector as test_strategies' no-sync check)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


SYNCING = ("item", "_local_scalar_dense", "nonzero", "unique", "masked_select")
NO_SYNC = ("grouped", "grouped_fm", "padded_capacity", "dense_experts")


def _moe(dtype: torch.dtype, strategy: str = "grouped") -> me.MoE:
    torch.manual_seed(0)  # 32 features, 8 classes: 16-byte rows in bf16, as grouped_mm wants
    return me.MoE(4, 32, 2, 2, input_dim=32, classes=8, strategy=strategy).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_gives_an_empty_output_for_an_empty_batch(name, dtype):
    m = _moe(dtype)
    x = torch.randn(0, 32, dtype=dtype)
    with torch.inference_mode():
        idx, gate_w = m.route(x)
        assert idx.shape == gate_w.shape == (0, 2)
        y = STRATEGIES[name](x, idx, gate_w, m.stack())
        m.strategy = name
        y2 = m(x)
    assert y.shape == y2.shape == (0, 8) and y.dtype == y2.dtype == dtype


@pytest.mark.parametrize("name", NO_SYNC)
def test_fast_strategies_stay_sync_free_on_an_empty_batch(name):
    m = _moe(torch.float32)
    x = torch.randn(0, 32)
    with torch.inference_mode():
        idx, gate_w = m.route(x)
        with _Ops() as rec:
            STRATEGIES[name](x, idx, gate_w, m.stack())
    assert [o for o in rec.ops if any(w in o for w in SYNCING)] == []


def test_auto_does_not_probe_an_empty_batch_and_counts_nothing():
    m = _moe(torch.float32, "auto")
    with torch.inference_mode():
        assert m(torch.randn(0, 32)).shape == (0, 8)
    assert m.auto_choice is None  # nothing was timed
    m.strategy = "padded_capacity"
    with torch.inference_mode():
        m(torch.randn(0, 32))
    assert m.strategy_info()["routed_pairs"] == 0 and m.strategy_info()["dropped_pairs"] == 0


@pytest.mark.parametrize("T", [1, 2, 3])
def test_tiny_batches_still_agree_across_strategies(T):
    m = _moe(torch.float32)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(T))
    with torch.inference_mode():
        idx, gate_w = m.route(x)
        ref = STRATEGIES["active_loop"](x, idx, gate_w, m.stack())
        for name in STRATEGIES:
            ex = m.stack()._replace(capacity_factor=2.0)  # C = T: padded_capacity drops nothing
            torch.testing.assert_close(STRATEGIES[name](x, idx, gate_w, ex), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("pairs", "E", "T", "C"), [(0, 8, 0, 0), (2, 8, 1, 1), (0, 1, 0, 0)])
def test_capacity_of_an_empty_batch_is_zero_else_at_least_one(pairs, E, T, C):
    assert capacity_for(pairs, E, T, 1.25) == C


# --- matched_dense ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [nn.Linear(3, 3), None, dict(GOOD), "small", 8, SimpleNamespace(experts=4)])
def test_matched_dense_of_something_without_a_shape_is_a_type_error(spec):
    e = raises_one_line(TypeError, lambda: me.matched_dense(spec), "matched_dense", "spec", "MoE", "ModelSpec")
    assert all(f in str(e) for f in SHAPE)


@pytest.mark.parametrize("match", ["half", "", "TOTAL", None, 1])
def test_matched_dense_match_must_be_total_or_active(match):
    raises_one_line(ValueError, lambda: me.matched_dense(me.presets["small"], match), "match=", "'total'", "'active'")


def test_matched_dense_takes_an_moe_a_spec_or_any_shaped_object():
    moe = me.MoE(**GOOD)
    by_moe = me.matched_dense(moe, "active")
    by_spec = me.matched_dense(me.ModelSpec(**GOOD), "active")
    by_duck = me.matched_dense(SimpleNamespace(**{k: np.int32(v) for k, v in GOOD.items()}), "active")
    assert by_moe.width == by_spec.width == by_duck.width and type(by_duck.width) is int
    assert by_moe.num_params >= moe.num_active_params


@pytest.mark.parametrize(("field", "bad", "exc"), [("hidden", 0, ValueError), ("layers", -2, ValueError),
                                                   ("top_k", 9, ValueError), ("classes", 2.5, TypeError),
                                                   ("input_dim", "784", TypeError)])
def test_matched_dense_checks_a_duck_shape_before_its_arithmetic(field, bad, exc):
    raises_one_line(exc, lambda: me.matched_dense(SimpleNamespace(**{**GOOD, field: bad})), f"{field}=")


@pytest.mark.parametrize(("kw", "exc"), [({"width": 0}, ValueError), ({"layers": 1.0}, TypeError),
                                         ({"input_dim": -3}, ValueError)])
def test_dense_mlp_checks_its_sizes(kw, exc):
    args = {"input_dim": 12, "width": 8, "layers": 2, "classes": 3, **kw}
    raises_one_line(exc, lambda: me.DenseMLP(**args), f"{next(iter(kw))}=")


# --- benchmark, make_meter, auto_meter -----------------------------------------------------------


def test_benchmark_takes_a_lambda_and_reports_its_flops_as_not_known():
    w = torch.randn(8, 4)
    x = torch.randn(6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto's meter may be the labelled estimate here
        res = me.benchmark(lambda x: x @ w, x, duration=0.1, repeats=1, warmup=0)
    assert res.summary["flops_per_inference"] is None and res.summary["achieved_gflops"] is None
    assert res.flops_method.startswith("not known") and "flops_per_inference=" in res.flops_method
    assert res.device == "cpu" and res.model == "<lambda>" and res.batch_size == 6 and res.repeats == 1
    assert res.inferences_per_second > 0


def test_benchmark_takes_plain_functions_over_tuples_and_dicts():
    none = me.make_meter("none", "cpu")
    w = torch.randn(8, 4)

    def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ w + b

    by_tuple = me.benchmark(mix, (torch.randn(5, 8), torch.randn(4)), duration=0.1, repeats=1, warmup=0,
                            meter=none)
    assert by_tuple.model == "mix" and by_tuple.batch_size == 5 and by_tuple.summary["flops_per_inference"] is None
    by_dict = me.benchmark(mix, {"a": torch.randn(3, 8), "b": torch.randn(4)}, duration=0.1, repeats=1, warmup=0,
                           meter=none, flops_per_inference=64)
    assert by_dict.batch_size == 3 and by_dict.summary["flops_per_inference"] == 64
    assert by_dict.flops_method.startswith("given")
    res = me.benchmark(torch.tanh, torch.randn(7, 2), duration=0.1, repeats=1, warmup=0, meter=none)
    assert res.batch_size == 7 and res.summary["flops_per_inference"] is None


@pytest.mark.parametrize("model", [3, None, "model", torch.randn(2, 2)])
def test_benchmark_of_something_not_callable_is_a_type_error(model):
    raises_one_line(TypeError, lambda: me.benchmark(model, torch.randn(2, 4), duration=0.1), "model", "callable")


@pytest.mark.parametrize(("kw", "name"), [({"meter": "estimate"}, "meter="), ({"meter": 3}, "meter="),
                                          ({"sync": "cuda"}, "sync="), ({"repeats": 2.0}, "repeats="),
                                          ({"duration": "1"}, "duration="), ({"warmup": None}, "warmup="),
                                          ({"flops_per_inference": 1e6}, "flops_per_inference="),
                                          ({"batch_size": True}, "batch_size=")])
def test_benchmark_arguments_of_a_wrong_kind_are_type_errors(kw, name):
    raises_one_line(TypeError, lambda: me.benchmark(nn.Linear(4, 4), torch.randn(2, 4), **{"duration": 0.1, **kw}),
                    name)


@pytest.mark.parametrize(("batch", "exc"), [("x", TypeError), (np.zeros((2, 4)), TypeError), (3, TypeError),
                                            ({1: torch.randn(2, 4)}, TypeError)])
def test_benchmark_batch_of_a_wrong_kind_is_a_type_error(batch, exc):
    raises_one_line(exc, lambda: me.benchmark(lambda *a, **k: None, batch, duration=0.1), "example_batch")


@pytest.mark.parametrize("tdp", [float("inf"), float("nan"), 0, -35.0, -float("inf")])
@pytest.mark.parametrize("which", ["make", "auto"])
def test_meters_refuse_a_tdp_that_is_not_finite_and_positive(tdp, which):
    call = (lambda: me.make_meter("estimate", "cpu", cpu_tdp_watts=tdp)) if which == "make" else \
        (lambda: me.auto_meter("cpu", cpu_tdp_watts=tdp, notice=None))
    assert isinstance(raises_one_line(ValueError, call, "cpu_tdp_watts=", "> 0"), ConfigError)  # as the CLI's


@pytest.mark.parametrize("tdp", ["35", True, [35]])
def test_meters_refuse_a_tdp_of_a_wrong_kind(tdp):
    raises_one_line(TypeError, lambda: me.make_meter("estimate", "cpu", cpu_tdp_watts=tdp), "cpu_tdp_watts=")
    raises_one_line(TypeError, lambda: me.auto_meter("cpu", cpu_tdp_watts=tdp, notice=None), "cpu_tdp_watts=")


def test_meter_names_devices_and_notice_are_checked():
    raises_one_line(ValueError, lambda: me.make_meter("bogus"), "name=", "estimate")
    raises_one_line(TypeError, lambda: me.make_meter(None), "name=", "estimate")
    raises_one_line(TypeError, lambda: me.make_meter(["rapl"]), "name=")
    for bad in ("cuda:x", "gpu", ""):
        raises_one_line(ValueError, lambda bad=bad: me.make_meter("estimate", bad), "device=")
        raises_one_line(ValueError, lambda bad=bad: me.auto_meter(bad, notice=None), "device=")
    for bad in ([0], 1.5, True):
        raises_one_line(TypeError, lambda bad=bad: me.make_meter("none", bad), "device=")
    raises_one_line(TypeError, lambda: me.auto_meter("cpu", notice="print"), "notice=")
    assert me.make_meter("estimate", torch.device("cpu"), cpu_tdp_watts=35).tdp_watts == 35
    assert me.make_meter("estimate", "cpu", cpu_tdp_watts=np.float64(12.5)).tdp_watts == 12.5
