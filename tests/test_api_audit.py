"""The Python API checked as a notebook uses it: figures against an independent count, misuse refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import moe_energy as me
from moe_energy.models.archs import custom_arch

ARCH = custom_arch(64, 96, 8, 2, name="audit")
SHARED = custom_arch(64, 96, 8, 2, shared_experts=1, shared_gate=True, name="audit-shared")


def _bench(model: nn.Module, x: torch.Tensor) -> me.BenchmarkResult:
    return me.benchmark(model, x, duration=0.05, repeats=1, warmup=0, meter=me.make_meter("none"))


def _executed_flops_per_token(layer: me.MoELayer, x: torch.Tensor) -> float:
    """2 x the multiply-adds of one forward as active_loop runs it (one F.linear per routed pair), per token."""
    layer.strategy = "active_loop"
    with torch.inference_mode(), FlopCounterMode(display=False) as c:
        layer(x)
    return c.get_total_flops() / x.shape[0]


@pytest.mark.parametrize("arch", [ARCH, SHARED], ids=lambda a: a.name)
@pytest.mark.parametrize("strategy", ["grouped", "dense_experts", "auto"])
def test_an_llm_layers_flops_are_its_work_whatever_the_strategy(arch, strategy):
    layer = me.MoELayer.from_arch(arch)
    x = torch.randn(16, arch.d_model, generator=torch.Generator().manual_seed(0))
    d, i, e, k = arch.d_model, arch.ffn_dim, arch.experts, arch.top_k
    by_hand = 2 * (d * e + k * 3 * d * i + arch.shared_experts * 3 * d * arch.shared_width + d * arch.shared_gate)
    assert _executed_flops_per_token(layer, x) == by_hand
    layer.strategy = strategy  # grouped_mm is invisible to FlopCounterMode; dense_experts and auto's probe run more
    res = _bench(layer, x)
    assert res.summary["flops_per_inference"] == by_hand
    assert res.flops_method.startswith("arithmetic") and res.batch_size == 16  # tokens are the inferences


def test_a_matched_dense_ffns_flops_are_two_per_weight():
    dense = me.matched_dense(me.MoELayer.from_arch(ARCH), match="active")
    res = _bench(dense, torch.randn(8, ARCH.d_model))
    assert res.summary["flops_per_inference"] == 2 * sum(p.numel() for p in dense.parameters())


def test_a_module_holding_an_moe_layer_has_no_flop_count_rather_than_a_wrong_one():
    wrapped = nn.Sequential(me.MoELayer.from_arch(ARCH, strategy="grouped"))
    res = _bench(wrapped, torch.randn(8, ARCH.d_model))
    assert res.summary["flops_per_inference"] is None and res.summary["achieved_gflops"] is None
    assert "MoE layer" in res.flops_method and "flops_per_inference=" in res.flops_method
