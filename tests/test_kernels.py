"""models/kernels.py: oneDNN's linear on a CPU gives what F.linear and grouped_mm give, and steps aside for
autograd, torch.compile and other dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_energy.models import kernels
from moe_energy.models.kernels import FastLinear, grouped_linear, linear, use_onednn

pytestmark = pytest.mark.skipif(not kernels.ONEDNN, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def any_weight_size(monkeypatch):
    """Tiny weights here: let oneDNN take them as it takes an LLM expert's (the size rule has its own test)."""
    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHT", 0)


def _reference(h: torch.Tensor, w: torch.Tensor, ends: list[int], b: torch.Tensor | None) -> torch.Tensor:
    """Each group through its own weight, in float64 with F.linear."""
    out, start = [], 0
    for e, end in enumerate(ends):
        out.append(F.linear(h[start:end].double(), w[e].double(), None if b is None else b[e].double()))
        start = end
    return torch.cat(out)


def test_weights_too_small_to_repay_a_onednn_call_stay_with_the_plain_op(monkeypatch):
    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHT", 2**18)
    x = torch.randn(4, 512)
    with torch.no_grad():
        assert not use_onednn(x, torch.randn(256, 512))  # 2^17 elements
        assert use_onednn(x, torch.randn(512, 512))  # 2^18
        assert use_onednn(x, torch.randn(3, 512, 512)[1])  # one expert of a stack


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=6), bias=st.booleans(), in_out=st.booleans())
def test_grouped_linear_matches_each_group_through_its_own_weight(counts: list[int], bias: bool, in_out: bool):
    g = torch.Generator().manual_seed(sum(counts))
    E, d_in, d_out = len(counts), 8, 12
    w = torch.randn(E, d_out, d_in, generator=g)
    if in_out:  # stored [E, in, out], read as an [E, out, in] view
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    b = torch.randn(E, d_out, generator=g) if bias else None
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    h = torch.randn(int(ends[-1]), d_in, generator=g)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    with torch.no_grad():
        assert use_onednn(h, w)
        got = grouped_linear(h, w, ends, b, expert)
    assert got.shape == (h.shape[0], d_out)
    torch.testing.assert_close(got.double(), _reference(h, w, ends.tolist(), b), atol=1e-5, rtol=1e-5)


def test_the_plain_ops_take_over_where_onednn_must_not_run():
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(3, 4)
    assert not use_onednn(x, w)  # autograd needs F.linear's backward
    with torch.no_grad():
        assert use_onednn(x, w)
        assert not use_onednn(x.double(), w.double())  # fp64: not a oneDNN dtype
        assert not use_onednn(x.half(), w.half())
    y = linear(x, w)
    y.sum().backward()  # the training path keeps its gradient
    torch.testing.assert_close(w.grad, x.sum(0).expand(6, 4))


def test_fast_linear_is_an_nn_linear_with_the_same_state_dict_and_outputs():
    torch.manual_seed(0)
    fast, plain = FastLinear(16, 24), torch.nn.Linear(16, 24)
    plain.load_state_dict(fast.state_dict())
    assert isinstance(fast, torch.nn.Linear) and set(fast.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 5, 16)  # any leading dims, as nn.Linear takes
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    for dt in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            assert fast.to(dt)(x.to(dt)).dtype == dt


def test_grouped_linear_without_onednn_is_grouped_mm_plus_the_gathered_bias():
    counts = [2, 0, 3]
    w, b = torch.randn(3, 8, 4), torch.randn(3, 8)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    h = torch.randn(5, 4, requires_grad=True)  # grad on: the plain path
    expert = torch.tensor([0, 0, 2, 2, 2])
    got = grouped_linear(h, w, ends, b, expert)
    torch.testing.assert_close(got.detach().double(), _reference(h.detach(), w, ends.tolist(), b), atol=1e-5, rtol=1e-5)
    (got * torch.randn_like(got)).sum().backward()  # not .sum(): grouped_mm's backward refuses a stride-0 grad
    assert h.grad is not None and h.grad.shape == (5, 4) and bool(h.grad.abs().sum() > 0)


@pytest.mark.parametrize("grad", [False, True])
def test_grouped_linear_runs_widths_grouped_mm_refuses(grad: bool, monkeypatch):
    """Issue 25: an odd width (7 in, 5 out in fp32: rows of 28 and 20 bytes) broke grouped_mm's 16-byte rule; on a
    CPU the plain path now loops over the groups, with or without a gradient."""
    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHT", 2**30)  # the plain path (oneDNN ran any shape already)
    counts = [3, 0, 2, 1]
    w, b = torch.randn(4, 5, 7), torch.randn(4, 5)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    h = torch.randn(6, 7, requires_grad=grad)
    expert = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    assert not kernels.grouped_mm_ready(h) and not kernels.grouped_mm_ready(w.transpose(1, 2))
    with torch.set_grad_enabled(grad):
        got = grouped_linear(h, w, ends, b, expert)
    torch.testing.assert_close(got.detach().double(), _reference(h.detach(), w, ends.tolist(), b), atol=1e-5,
                               rtol=1e-5)
    if grad:
        got.square().sum().backward()
        assert h.grad is not None and bool(h.grad.abs().sum() > 0)


def test_padded_grouped_mm_equals_each_group_through_its_own_weight():
    """The path other devices take for such widths, run here through the CPU's grouped_mm: zero columns padded
    onto ``in`` and rows onto ``out`` change nothing."""
    counts = [2, 3, 0]
    w = torch.randn(3, 5, 7)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    h = torch.randn(5, 7)
    got = kernels.padded_grouped_mm(h, w, ends)
    assert got.shape == (5, 5)
    torch.testing.assert_close(got.double(), _reference(h, w, ends.tolist(), None), atol=1e-5, rtol=1e-5)


def test_grouped_mm_ready_reads_torch_s_own_stride_rule():
    assert kernels.grouped_mm_ready(torch.randn(3, 8))  # 32-byte rows
    assert not kernels.grouped_mm_ready(torch.randn(3, 6))  # 24-byte rows
    assert kernels.grouped_mm_ready(torch.randn(2, 6, 8).transpose(1, 2))  # column-major, 32-byte columns
    assert not kernels.grouped_mm_ready(torch.randn(2, 8, 6).transpose(1, 2))  # column-major, 24-byte columns
    assert not kernels.grouped_mm_ready(torch.randn(3, 9)[:, 1:])  # data 4 bytes off 16
    assert kernels.grouped_mm_ready(torch.randn(3, 8, dtype=torch.bfloat16))  # 16-byte rows in bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_takes_the_matrix_vector_product_and_gives_the_gemm_s_answer(dtype, bias, monkeypatch):
    """A decoding row (one row an expert) reads a row-major weight through torch.mv; more rows, or a transposed
    weight (gpt-oss's in_out view), keep oneDNN. Either way the answer is the float64 product's, to the dtype."""
    if not (dtype == torch.float32 or torch.bfloat16 in kernels.ONEDNN_DTYPES):
        pytest.skip("no native bf16 oneDNN kernel on this CPU")
    calls: list[tuple[int, ...]] = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda w, x: calls.append(tuple(w.shape)) or mv(w, x))
    w, b = torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype) if bias else None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for x, wt, n_mv in ((torch.randn(1, 64).to(dtype), w, 1), (torch.randn(3, 64).to(dtype), w, 0),
                            (torch.randn(1, 64).to(dtype), w.t().contiguous().t(), 0)):
            calls.clear()
            y = linear(x, wt, b)
            ref = F.linear(x.double(), wt.double(), None if b is None else b.double())
            assert y.shape == (x.shape[0], 48) and y.dtype == dtype and len(calls) == n_mv
            assert float((y.double() - ref).norm() / ref.norm()) < tol
        stack = torch.randn(4, 48, 64).to(dtype)  # a grouped layer's decode: groups of 1 row, 0 rows, 2 rows
        calls.clear()
        h = torch.randn(3, 64).to(dtype)
        y = grouped_linear(h, stack, torch.tensor([1, 1, 3, 3], dtype=torch.int32))
        assert len(calls) == 1 and torch.allclose(y.double(), _reference(h, stack, [1, 1, 3, 3], None), rtol=tol,
                                                  atol=tol * 10)
