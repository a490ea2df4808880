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


@bf16_onednn
def test_pack_packs_its_modules_weights_only_and_only_once_more_than_one_row_reads_them():
    """kernels.pack (what an LLM-layer run does) with PREPACK off: its module's bf16 weights are packed on their first
    multi-row use, a weight it was not given never is, one row (torch.mv) packs nothing; it returns their bytes."""
    kernels.PREPACK = False
    mine, other = torch.nn.Linear(16, 24, bias=False).bfloat16(), _stack()
    assert kernels.pack(mine) == 24 * 16 * 2 and kernels.pack(mine) == 0  # registered once
    assert kernels.pack(torch.nn.Linear(16, 24)) == 0  # fp32: nothing to pack
    with torch.no_grad():
        linear(torch.randn(1, 16).bfloat16(), mine.weight)
        assert len(kernels._PACKED[mine.weight]) == 1  # only its version: one row read it through mv
        y = linear(torch.randn(3, 16).bfloat16(), mine.weight)
        linear(torch.randn(3, 16).bfloat16(), other[0])
    assert y.shape == (3, 24) and len(kernels._PACKED[mine.weight]) == 2 and other not in kernels._PACKED


def test_a_bf16_layer_run_counts_the_packed_copies_where_it_packs(monkeypatch):
    """The memory a layer run checks holds one packed copy of each bf16 weight where oneDNN runs bf16 (the copy
    doubles the weights), none in fp32 or int8 or where oneDNN has no bf16."""
    from moe_energy.config import RunOptions
    from moe_energy.models.archs import get_arch
    from moe_energy.models.plan import ModelPlan
    from moe_energy.runner import layer

    cpu, plan = torch.device("cpu"), ModelPlan.of("moe", get_arch("olmoe-1b-7b"))
    monkeypatch.setattr(kernels, "ONEDNN_DTYPES", (torch.float32, torch.bfloat16))
    assert layer.packed_bytes(plan, "bfloat16", cpu) == plan.weight_bytes("bfloat16") > 8e8
    assert layer.packed_bytes(plan, "float32", cpu) == layer.packed_bytes(plan.quantized("int8"), "bfloat16", cpu) \
        == layer.packed_bytes(plan, "bfloat16", torch.device("meta")) == 0
    need = plan.memory_bytes(1, "bfloat16") + plan.weight_bytes("bfloat16")  # between the two: fits only unpacked
    monkeypatch.setattr(layer.memory, "available_bytes", lambda device: need - plan.weight_bytes("bfloat16") // 2)
    opts = RunOptions(dtype="bfloat16", device="cpu")
    assert "building moe" in (layer.fit_alone(plan, opts, [1], cpu) or "")
    monkeypatch.setattr(kernels, "ONEDNN_DTYPES", (torch.float32,))
    assert layer.fit_alone(plan, opts, [1], cpu) is None
