"""models/quant.py: int8 weight-only round trips within half a step per channel, and every kernel path gives
the dequantized weight's answer (tiny shapes: each path is forced by its row count, not by size)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_energy.models import quant
from moe_energy.models.quant import QWeight, dequantize, grouped_linear, linear, quantize

# bf16 output: 8 significant bits, so a dot product of ~16 terms of size ~1 is off by ~2^-8 of its magnitude
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_round_trip_is_within_half_a_step_per_channel():
    w = _w(24, 40) * torch.logspace(-3, 1, 24)[:, None]  # channels of very different ranges
    q = quantize(w)
    assert q.qdata.dtype == torch.int8 and q.qdata.shape == (24, 40) and q.qdata.is_contiguous()
    assert q.scale.dtype == torch.float32 and q.scale.shape == (24,)
    assert int(q.qdata.abs().max()) <= 127 and bool((q.qdata.abs().amax(-1) == 127).all())  # each row's max hits 127
    err = (dequantize(q) - w).abs()  # [out, in]
    assert bool((err <= q.scale[:, None] / 2 + 1e-7).all())
    assert float((err.amax(-1) / w.abs().amax(-1)).max()) <= 0.5 / 127 + 1e-6  # relative to each channel


def test_a_stack_quantizes_expert_by_expert_like_each_expert_alone():
    w = _w(3, 16, 8)  # [E, out, in]
    q = quantize(w)
    assert q.qdata.shape == (3, 16, 8) and q.scale.shape == (3, 16)
    for e in range(3):
        one = quantize(w[e])
        assert torch.equal(q[e].qdata, one.qdata) and torch.equal(q[e].scale, one.scale)


def test_strided_and_bf16_weights_quantize_to_contiguous_int8():
    w = _w(2, 8, 16).transpose(1, 2)  # gpt-oss's [E, in, out] storage read as [E, out, in]
    q = quantize(w.to(torch.bfloat16))
    assert q.qdata.is_contiguous() and q.qdata.shape == (2, 16, 8)
    assert torch.allclose(dequantize(q), w.to(torch.bfloat16).float(), atol=float(q.scale.max()))


def test_an_all_zero_channel_gets_a_finite_scale_and_zero_weights():
    w = _w(4, 8)
    w[2] = 0
    q = quantize(w)
    assert bool(torch.isfinite(q.scale).all()) and float(q.scale[2]) > 0
    assert not bool(q.qdata[2].any())
    assert bool(torch.isfinite(dequantize(q)).all()) and not bool(dequantize(q)[2].any())
    assert quantize(torch.zeros(0, 8)).scale.shape == (0,)  # no channels at all
    assert quantize(torch.zeros(3, 0, 8)).qdata.shape == (3, 0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 3, 8, 20])  # bf16: 1 folded, 0..8 ATen's int8 kernel, 20 dequantized
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_the_dequantized_reference(monkeypatch, dtype, rows, bias):
    monkeypatch.setattr(quant, "FOLD_MIN_K", 64)  # in=16: one row folds 4 channels a row (out=20: by 4, not 8)
    q = quantize(_w(20, 16))
    x = _w(rows, 16, seed=1).to(dtype)
    b = _w(20, seed=2).to(dtype) if bias else None
    with torch.inference_mode():
        got = linear(x, q, b)
    ref = F.linear(x.double(), dequantize(q, torch.float64), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (rows, 20)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


@pytest.mark.parametrize(("rows", "out", "k", "f"), [
    (1, 2048, 2048, 2), (1, 2048, 1024, 4), (1, 2048, 768, 1), (1, 1536, 2048, 2), (1, 6, 1024, 1),
    (2, 2048, 2048, 1), (1, 2048, 4096, 1), (1, 7, 2048, 1),
])
def test_fold_factor_lengthens_short_weight_rows_only_for_one_row(rows, out, k, f):
    assert quant.fold_factor(rows, out, k) == f


def test_linear_with_autograd_takes_the_plain_op_and_still_agrees():
    q = quantize(_w(12, 16))
    x = _w(5, 16, seed=1).requires_grad_()
    got = linear(x, q)
    got.sum().backward()
    torch.testing.assert_close(got.detach(), F.linear(x.detach(), dequantize(q)))
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[2, 0, 9, 1], [0, 0, 0, 0], [0, 5, 0, 0]])
def test_grouped_linear_equals_each_group_through_its_own_dequantized_weight(dtype, counts):
    E, d_in, d_out = len(counts), 16, 12
    q = quantize(_w(E, d_out, d_in))
    b = _w(E, d_out, seed=3).to(dtype)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    h = _w(int(ends[-1]), d_in, seed=1).to(dtype)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    with torch.inference_mode():
        got = grouped_linear(h, q, ends, b, expert)
    ref = torch.cat([F.linear(h[expert == e].double(), dequantize(q[e], torch.float64), b[e].double())
                     for e in range(E)]) if len(h) else torch.zeros(0, d_out, dtype=torch.float64)
    assert got.shape == (len(h), d_out) and got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


def test_qweight_indexes_one_expert():
    q = QWeight(torch.zeros(3, 4, 5, dtype=torch.int8), torch.ones(3, 4))
    assert q[1].qdata.shape == (4, 5) and q[1].scale.shape == (4,) and q.shape == (3, 4, 5)


@pytest.mark.parametrize("k", [40, 520, 2056])
def test_widths_the_int8pack_kernel_cannot_read_take_the_dequantized_gemm(monkeypatch, k):
    """torch's int8pack kernel segfaults on inputs not a multiple of 16 wide: they must never reach it."""
    calls: list[int] = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: calls.append(x.shape[-1]) or real(x, w, s))
    q = quantize(_w(32, k))
    for rows in (1, 4):
        x = _w(rows, k, seed=1).to(torch.bfloat16)
        y, ref = linear(x, q).float(), F.linear(x.float(), dequantize(q))
        assert y.shape == (rows, 32) and float((y - ref).norm() / ref.norm()) < 0.01  # bf16 rounding over k terms
    assert calls == []
    x = _w(1, 64, seed=1).to(torch.bfloat16)
    linear(x, quantize(_w(32, 64)))
    assert len(calls) == 1  # a width it reads safely still takes it


def test_qlinear_and_quantize_linears_replace_every_linear_but_the_skipped():
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Sequential(torch.nn.Linear(32, 16, bias=False)))
    m.router = torch.nn.Linear(64, 4)
    x = _w(3, 64, seed=2)
    with torch.no_grad():
        ref = m[1](m[0](x))
        assert quant.quantize_linears_(m, skip=("router",)) == 2
        assert isinstance(m[0], quant.QLinear) and isinstance(m[1][0], quant.QLinear)
        assert type(m.router) is torch.nn.Linear
        assert m[0].qweight.dtype == torch.int8 and m[0].scale.shape == (32,) and m[1][0].bias is None
        y = m[1](m[0](x.reshape(1, 3, 64)))  # leading dims kept
    assert y.shape == (1, 3, 16)
    assert float((y[0] - ref).norm() / ref.norm()) < 0.02
