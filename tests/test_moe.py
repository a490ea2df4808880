"""The MoE module: one set of weights for every strategy, layouts that keep values, facts for the results."""

from __future__ import annotations

import pytest
import torch

from moe_energy.models import MoE
from moe_energy.models.experts import ReluMLPExperts
from moe_energy.runner import prepare  # noqa: F401 - installs strategy auto's timing probe


def tiny(strategy: str = "grouped", **kw) -> MoE:
    torch.manual_seed(0)
    return MoE(4, 16, 2, 2, input_dim=12, classes=4, strategy=strategy, **kw).eval()


def test_expert_copy_matches_the_stacked_weights():
    m = tiny("active_loop")
    x = torch.randn(10, 12)
    idx, gate_w = m.route(x)
    y = torch.stack([sum(gate_w[t, j] * m.expert(int(idx[t, j]))(x[t]) for j in range(2)) for t in range(10)])
    torch.testing.assert_close(m(x), y)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_set_layout_keeps_values_parameters_and_shapes(layout):
    m = tiny()
    x = torch.randn(9, 12)
    before = m(x)
    params = [id(p) for p in m.parameters()]
    values = [p.detach().clone() for p in m.parameters()]
    m.set_layout(layout)
    assert m.layout == layout
    assert [id(p) for p in m.parameters()] == params  # optimizers and state dicts still hold them
    assert all(torch.equal(a, b) for a, b in zip(values, m.parameters()))
    assert [tuple(w.shape) for w in m.weights] == [(4, 16, 12), (4, 16, 16), (4, 4, 16)]
    torch.testing.assert_close(m(x), before)


def test_in_out_layout_keeps_grouped_mm_strides_aligned():
    # [E, 10, H] fp32 stored as [E, H, 10] would give grouped_mm a 40-byte row stride: the last layer stays
    torch.manual_seed(0)
    m = MoE(4, 16, 2, 2, input_dim=12, classes=10).eval()
    m.set_layout("in_out")
    assert m.weights[0].stride() == (12 * 16, 1, 16)
    assert m.weights[-1].is_contiguous()
    m.strategy = "grouped"
    m(torch.randn(5, 12))  # would raise if a stride were misaligned


def test_bad_strategy_and_layout_are_rejected():
    with pytest.raises(ValueError, match="unknown strategy"):
        tiny("fastest")
    with pytest.raises(ValueError, match="unknown layout"):
        tiny().set_layout("sideways")


def test_strategy_info_records_auto_choice_and_capacity_drops():
    m = tiny("auto")
    x = torch.randn(32, 12)
    with torch.inference_mode():
        m(x)
    info = m.strategy_info()
    assert info["strategy"] == "auto" and info["resolved_strategy"] in info["auto_probe_ms"]
    assert info["dropped_pairs"] is None
    m.strategy = "padded_capacity"
    m.capacity_factor = 0.5  # C = ceil(0.5 * 64 / 4) = 8 per expert: 32 pairs fit at most
    m.reset_pair_counts()
    with torch.inference_mode():
        m(x)
        m(x)
    info = m.strategy_info()
    assert info["routed_pairs"] == 128 and info["capacity_factor"] == 0.5
    assert 2 * 32 <= info["dropped_pairs"] <= 128 and info["dropped_pairs"] % 2 == 0
    assert info["resolved_strategy"] == "padded_capacity" and info["auto_probe_ms"] is None


def test_counters_are_not_in_the_state_dict_and_survive_a_cast():
    m = tiny()
    assert "pair_counts" not in m.state_dict()
    m.to(torch.bfloat16)
    assert m.pair_counts.dtype == torch.long and m.weights[0].dtype == torch.bfloat16


def test_stack_is_the_relu_family_over_the_modules_own_tensors():
    m = tiny(capacity_factor=2.0)
    ex = m.stack()
    assert isinstance(ex, ReluMLPExperts) and ex.capacity_factor == 2.0 and ex.counters is m.pair_counts
    assert all(a is b for a, b in zip(ex.weights, m.weights)) and ex.num_experts == 4 and ex.out_dim == 4
