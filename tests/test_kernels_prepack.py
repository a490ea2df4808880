"""kernels.prepack: bf16 weights packed once for oneDNN give the plain weights' answers, follow in-place
changes, and go with their weights."""

from __future__ import annotations

import gc

import pytest
import torch

from moe_energy.models import kernels
from moe_energy.models.kernels import grouped_linear, linear

pytestmark = pytest.mark.skipif(not kernels.ONEDNN, reason="this torch build has no oneDNN")
bf16_onednn = pytest.mark.skipif(torch.bfloat16 not in kernels.ONEDNN_DTYPES,
                                 reason="oneDNN runs no bf16 on this CPU (no avx512_core): nothing to pack")


@pytest.fixture(autouse=True)
def packing(monkeypatch):
    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHT", 0)  # tiny weights take oneDNN too
    kernels.prepack(True)
    yield
    kernels.prepack(False)


def _stack(E: int = 3, out: int = 24, d_in: int = 16) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(E, out, d_in, generator=torch.Generator().manual_seed(0)).bfloat16())


@bf16_onednn
def test_packed_linear_and_grouped_linear_give_the_plain_answers():
    w, b = _stack(), torch.randn(3, 24).bfloat16()
    ends = torch.tensor([2, 2, 7], dtype=torch.int32)
    h = torch.randn(7, 16).bfloat16()
    expert = torch.tensor([0, 0, 2, 2, 2, 2, 2])
    with torch.no_grad():
        got = (linear(h, w[1], b[1]), grouped_linear(h, w, ends, b, expert))
        assert len(kernels._PACKED[w]) == 1 + 3  # its version; expert 1 (linear), 0 and 2 (grouped: 1 has no rows)
        kernels.PREPACK = False
        plain = (linear(h, w[1], b[1]), grouped_linear(h, w, ends, b, expert))
    for g, p in zip(got, plain):
        torch.testing.assert_close(g.float(), p.float(), atol=2e-2, rtol=2e-2)


@bf16_onednn
def test_an_in_place_change_repacks_and_a_dropped_weight_drops_its_copies():
    w = _stack()
    x = torch.randn(2, 16).bfloat16()
    with torch.no_grad():
        before = linear(x, w[0])
        w.mul_(2)
        after = linear(x, w[0])
    torch.testing.assert_close(after.float(), 2 * before.float(), atol=2e-2, rtol=2e-2)
    del w
    gc.collect()
    assert len(kernels._PACKED) == 0


def test_fp32_and_inference_tensors_are_not_packed():
    with torch.inference_mode():
        w32 = torch.randn(24, 16)
        linear(torch.randn(2, 16), w32)
        wi = torch.randn(24, 16).bfloat16()  # no version counter: a packed copy could go stale unseen
        linear(torch.randn(2, 16).bfloat16(), wi)
    assert len(kernels._PACKED) == 0
