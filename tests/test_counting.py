"""Exact parameter counts of every preset and dense baseline, computed without allocating weights."""

import pytest
import torch

from moe_energy.config import PRESETS, ModelSpec
from moe_energy.models import DenseMLP, MoE, dense_width
from moe_energy.models.counting import (
    dense_flops,
    matched_width,
    mlp_params,
    moe_active_params,
    moe_flops,
    moe_params,
)

# From REFERENCE_FIGURES.md: (MoE params, active params, dense width, dense params)
REFERENCE = {
    "small": (2_687_192, 676_508, 977, 2_687_737),
    "large": (63_418_800, 15_864_120, 4_467, 63_426_943),
    "xl": (368_287_260, 92_083_590, 9_497, 368_360_149),
    "xxl": (2_789_237_600, 697_328_240, 23_539, 2_789_253_815),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_preset_counts_match_reference(name):
    spec = PRESETS[name]
    total, active, width, dense = REFERENCE[name]
    assert moe_params(spec) == total
    assert moe_active_params(spec) == active
    assert dense_width(spec, "total") == width
    assert mlp_params(spec.input_dim, width, spec.layers, spec.classes) == dense


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("match", ["total", "active"])
def test_matched_width_is_smallest_reaching_target(name, match):
    spec = PRESETS[name]
    target = moe_params(spec) if match == "total" else moe_active_params(spec)
    w = dense_width(spec, match)
    assert mlp_params(spec.input_dim, w, spec.layers, spec.classes) >= target
    assert mlp_params(spec.input_dim, w - 1, spec.layers, spec.classes) < target


def test_active_matched_widths():
    assert [dense_width(PRESETS[n], "active") for n in REFERENCE] == [416, 2171, 4700, 11730]


def test_counts_agree_with_allocated_modules():
    spec = ModelSpec(experts=5, hidden=12, layers=3, top_k=2, input_dim=30, classes=7)
    moe = MoE.from_spec(spec)
    assert sum(p.numel() for p in moe.parameters()) == moe_params(spec) == moe.num_params
    dense = DenseMLP(30, 17, 3, 7)
    assert sum(p.numel() for p in dense.parameters()) == mlp_params(30, 17, 3, 7) == dense.num_params


def test_matched_width_single_hidden_layer_is_linear_case():
    # L = 1: params = (in + 1 + out) W + out, no quadratic term
    w = matched_width(10_000, 100, 1, 10)
    assert mlp_params(100, w, 1, 10) >= 10_000 > mlp_params(100, w - 1, 1, 10)


def test_flops_count_matrix_products():
    spec = PRESETS["small"]
    # gate 784x8, then k experts of 784x256 + 2 x 256x256 + 256x10 multiply-accumulates
    macs = 784 * 8 + 2 * (784 * 256 + 2 * 256 * 256 + 256 * 10)
    assert moe_flops(spec) == 2 * macs
    assert dense_flops(784, 977, 3, 10) == 2 * (784 * 977 + 2 * 977 * 977 + 977 * 10)


def test_dense_mlp_shape_is_the_seeds():
    m = DenseMLP(784, 977, 3, 10)
    linears = [mod for mod in m if isinstance(mod, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(784, 977), (977, 977), (977, 977),
                                                                        (977, 10)]
    assert sum(isinstance(mod, torch.nn.ReLU) for mod in m) == 3
    assert m(torch.randn(5, 784)).shape == (5, 10)
