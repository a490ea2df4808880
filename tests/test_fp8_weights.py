"""--weights fp8 (issue 24): e4m3 weights and rows, each on its own scale. This host has no fp8 GPU, so the GPU
kernels' calls run here through the CPU's own torch._scaled_mm (oneDNN's reference kernel: the same operator, the
same arguments) and a stand-in for torch._scaled_grouped_mm, which has no CPU kernel; everything above them is
the shipped code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_energy.models import fp8, quant
from moe_energy.models.archs import custom_arch
from moe_energy.models.llm import MoELayer, quantize_weights
from moe_energy.models.plan import plans
from moe_energy.models.quant import QLinear

ARCH = custom_arch(64, 32, 8, 2, shared_experts=1, shared_gate=True)


def _x(n: int, k: int = 64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    x[0] *= 30  # rows of very different ranges: each keeps its own scale
    return x


def _w(out: int = 48, k: int = 64) -> torch.Tensor:
    return torch.randn(out, k, generator=torch.Generator().manual_seed(7)) * 0.1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_weights_are_e4m3_per_channel_and_rows_round_on_their_own_scale():
    w = _w()
    w[3] = 0
    q = quant.quantize(w, "fp8")
    assert q.qdata.dtype == fp8.FP8 and q.acts and q.scale.shape == (48,)
    assert torch.allclose(q.qdata.float().abs().amax(-1)[:3], torch.full((3,), fp8.FP8_MAX))
    assert torch.equal(quant.dequantize(q)[3], torch.zeros(64))
    assert 0 < _rel(quant.dequantize(q), w) < 0.04  # e4m3: 3 mantissa bits
    x = _x(3)
    r = fp8.round_rows(x)
    assert torch.equal(r[1:], torch.cat([fp8.round_rows(x[i:i + 1]) for i in (1, 2)]))  # a row's own numbers
    assert all(0 < _rel(r[i], x[i]) < 0.04 for i in range(3))
    assert torch.equal(fp8.round_rows(torch.zeros(2, 8)), torch.zeros(2, 8))


@pytest.fixture
def gpu_calls(monkeypatch):
    """The fp8 kernels' branch taken on this CPU: torch._scaled_mm runs here as it is; torch._scaled_grouped_mm,
    CUDA-only, is replaced by its documented meaning (row-wise scales, groups ending at ``offs``), each group
    through torch._scaled_mm. Records the grouped calls' arguments."""
    calls: list[dict] = []

    def grouped(a, b, scale_a, scale_b, offs, out_dtype):
        calls.append({"a": a.dtype, "b": b.shape, "b_strides": b.stride(), "offs": offs.tolist()})
        out, start = [], 0
        for g, end in enumerate(offs.tolist()):
            out.append(torch._scaled_mm(a[start:end], b[g], scale_a=scale_a[start:end, None],
                                        scale_b=scale_b[g][None, :], out_dtype=out_dtype))
            start = end
        return torch.cat(out)

    monkeypatch.setattr(fp8, "kernels_for", lambda x, grouped=False: True)
    monkeypatch.setattr(fp8, "_scaled_grouped_mm", grouped)
    return calls


@pytest.mark.parametrize("n", [1, 5])
def test_the_fp8_gemm_computes_the_reference_rounding(gpu_calls, n):
    q = quant.quantize(_w(), "fp8")
    x = _x(n)
    ref = F.linear(fp8.round_rows(x), quant.dequantize(q))  # the rounding spelled out, fp32
    y = quant.linear(x, q)  # torch._scaled_mm, bf16 out
    assert y.dtype == torch.float32 and y.shape == (n, 48)
    assert _rel(y, ref) < 4e-3  # bf16's output rounding, no more


def test_the_grouped_fp8_gemm_gets_every_expert_in_one_call(gpu_calls):
    stack = torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(4)) * 0.1  # [E, out, in]
    q = quant.quantize(stack, "fp8")
    h = _x(7)
    ends = torch.tensor([2, 2, 7], dtype=torch.int32)  # expert 1 has no rows
    b = torch.randn(3, 48)
    expert = torch.tensor([0, 0, 2, 2, 2, 2, 2])
    y = quant.grouped_linear(h, q, ends, b, expert)
    assert len(gpu_calls) == 1 and gpu_calls[0]["offs"] == [2, 2, 7] and gpu_calls[0]["a"] == fp8.FP8
    assert gpu_calls[0]["b"] == (3, 64, 48) and gpu_calls[0]["b_strides"][1] == 1  # [E, in, out], column-major
    rows = fp8.round_rows(h)
    ref = torch.cat([F.linear(rows[:2], quant.dequantize(q[0])) + b[0],
                     F.linear(rows[2:], quant.dequantize(q[2])) + b[2]])
    assert _rel(y, ref) < 4e-3


def test_an_fp8_layer_agrees_across_strategies_and_holds_e4m3_everywhere_but_the_router():
    layer = MoELayer.from_arch(ARCH, dtype="float32", seed=0, strategy="grouped")
    x = _x(12, ARCH.d_model, seed=2)
    with torch.no_grad():
        ref = layer(x)
        quantize_weights(layer, "fp8")
        outs = {}
        for s in ("grouped", "padded", "active_loop", "dense_experts", "grouped_fm"):
            layer.strategy = s
            outs[s] = layer(x)
    assert layer.experts.gate_up_proj.dtype == fp8.FP8 and layer.shared.down_proj.qweight.dtype == fp8.FP8
    assert layer.experts.packs is None and all(p.dtype == torch.float32 for p in layer.router.parameters())
    for s, y in outs.items():
        assert _rel(y, outs["grouped"]) < 1e-5, s
    assert 0.005 < _rel(outs["grouped"], ref) < 0.08


def test_an_fp8_linear_of_any_width_is_padded_to_the_kernels_and_cut_back(gpu_calls):
    lin = torch.nn.Linear(50, 30)
    ql = QLinear(lin, "fp8")
    assert ql.qweight.shape == (32, 64) and ql.bias.shape == (32,) and ql.pad_in == 14
    x = torch.randn(2, 3, 50)
    y = ql(x)
    assert y.shape == (2, 3, 30)
    q = quant.quantize(lin.weight, "fp8")
    ref = F.linear(fp8.round_rows(x.reshape(6, 50)), quant.dequantize(q), lin.bias.detach())
    assert _rel(y.reshape(6, 30), ref) < 4e-3


def test_fp8_is_refused_where_it_has_no_fast_kernel(monkeypatch):
    assert "cpu has no fast fp8 kernel" in fp8.problem(torch.device("cpu"), 64, 32)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert "NVIDIA A100-SXM4-80GB has 8.0" in fp8.problem(cuda, 64, 32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.problem(cuda, 64, 32) is None
    assert "multiple of 16" in fp8.problem(cuda, 64, 40)


def test_fp8_plans_read_and_hold_a_byte_a_weight_and_bound_at_the_fp8_rate():
    moe8, moe = plans(ARCH, ("moe",), "int8")[0], plans(ARCH, ("moe",), "fp8")[0]
    assert moe.weight_bytes("bfloat16") == moe8.weight_bytes("bfloat16")  # no packed copy, unlike w8a8
    assert moe.weight_bytes_read("bfloat16", 3) == moe8.weight_bytes_read("bfloat16", 3)
    assert moe.rate_key("bfloat16") == "fp8" and quant.describe("fp8").startswith("fp8 e4m3 weights")


@pytest.mark.parametrize("cmd", ["run", "sweep", "bench-strategies"])
def test_every_weights_format_is_named_in_the_help(cmd):
    """README documents --weights fp8 beside int8 and w8a8; --help must name every format the flag takes."""
    import argparse

    from moe_energy.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    helptext = next(a.help for a in sub._actions if "--weights" in a.option_strings)
    for name in quant.WEIGHT_FORMATS:
        assert f"{name}:" in helptext or f"{name} (" in helptext, (name, helptext)
