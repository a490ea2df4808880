"""Expert families: every strategy runs the SwiGLU family (silu and gpt-oss's clamped form, with and without
biases, concatenated or interleaved gate/up) and gives what a plain per-token loop gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_energy.models.experts import ExpertStack, ReluMLPExperts, SwiGLUExperts
from moe_energy.models.strategies import STRATEGIES, capacity_for, rank_in_expert
from moe_energy.runner import prepare  # noqa: F401 - installs strategy auto's timing probe

EXACT = ["masked_loop", "active_loop", "grouped", "grouped_fm", "padded", "dense_experts", "auto"]
VARIANTS = {  # name: (act, biases, interleaved)
    "silu": ("silu", False, False),
    "silu_bias": ("silu", True, False),
    "gpt_oss": ("gpt_oss", True, True),
    "gpt_oss_concat_nobias": ("gpt_oss", False, False),
}
# bf16 rounds the gate_up output, the gated product and the down output: measured up to 1.7e-2 * (|y| + 1)
BF16_ATOL, BF16_RTOL = 3e-2, 3e-2


def swiglu(E=4, d=16, inter=8, variant="silu", seed=0, **kw) -> SwiGLUExperts:
    """Random experts; gate_up at unit scale, so gpt-oss's clamps (limit 7 by default, 2 here) really bite."""
    act, bias, interleaved = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * inter, d, generator=g) / d**0.5 * 2  # [E, 2I, d]
    down = torch.randn(E, d, inter, generator=g) / inter**0.5  # [E, d, I]
    gb = torch.randn(E, 2 * inter, generator=g) if bias else None  # [E, 2I]
    db = torch.randn(E, d, generator=g) if bias else None  # [E, d]
    return SwiGLUExperts(gate_up, down, gb, db, act, limit=2.0, interleaved=interleaved, **kw)


def routing(T: int, E: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    return idx, torch.randn(T, k, generator=g).softmax(-1), g


def reference(x: torch.Tensor, idx: torch.Tensor, gate_w: torch.Tensor, f: SwiGLUExperts) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time, in float64, written out by hand."""
    y = torch.zeros(x.shape[0], f.out_dim, dtype=torch.float64)
    n = f.gate_up.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = f.gate_up[e].double() @ x[t].double()  # [2I]
            if f.gate_up_bias is not None:
                gu = gu + f.gate_up_bias[e].double()
            gate, up = (gu[0::2], gu[1::2]) if f.interleaved else (gu[:n], gu[n:])
            if f.act == "silu":
                a = gate * torch.sigmoid(gate) * up
            else:  # gpt-oss: gate clamped above, up clamped both ways, up shifted by 1
                gate, up = gate.clamp(max=f.limit), up.clamp(-f.limit, f.limit)
                a = (up + 1) * gate * torch.sigmoid(f.alpha * gate)
            out = f.down[e].double() @ a
            if f.down_bias is not None:
                out = out + f.down_bias[e].double()
            y[t] += gate_w[t, j].double() * out
    return y


@pytest.mark.parametrize("T", [0, 1, 3, 17])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", EXACT + ["padded_capacity"])
def test_every_strategy_runs_the_swiglu_family_exactly(name, variant, T):
    f = swiglu(variant=variant, capacity_factor=4 / 2)  # capacity T: padded_capacity drops nothing
    idx, gate_w, g = routing(T, 4, 2, seed=T)
    x = torch.randn(T, 16, generator=g)
    with torch.inference_mode():
        y = STRATEGIES[name](x, idx, gate_w, f)
    assert y.shape == (T, 16) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, idx, gate_w, f), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["silu", "gpt_oss"])
@pytest.mark.parametrize("name", EXACT)
def test_bf16_swiglu_within_stated_tolerance(name, variant):
    f = swiglu(E=4, d=32, inter=16, variant=variant)  # 16 and 32 bf16: 16-byte rows for grouped_mm
    idx, gate_w, g = routing(24, 4, 2, seed=5)
    x, gate_w = torch.randn(24, 32, generator=g).bfloat16(), gate_w.bfloat16()
    f16 = f._replace(**{k: v.bfloat16() for k, v in f._asdict().items() if isinstance(v, torch.Tensor)})
    ref = reference(x, idx, gate_w, f16)  # the same bf16 values, float64 arithmetic: only rounding differs
    with torch.inference_mode():
        y = STRATEGIES[name](x, idx, gate_w, f16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_swiglu_capacity_drops_the_latest_pairs_and_counts_them():
    counters = torch.zeros(2, dtype=torch.long)
    f = swiglu(variant="silu_bias", capacity_factor=1.0, counters=counters)
    T = 12
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, 16, generator=g)
    idx = torch.stack([torch.tensor([3, int(torch.randint(0, 3, (1,), generator=g))]) for _ in range(T)])
    gate_w = torch.rand(T, 2, generator=g)
    C = capacity_for(T * 2, 4, T, 1.0)  # 6: expert 3 gets all 12 tokens
    with torch.inference_mode():
        y = STRATEGIES["padded_capacity"](x, idx, gate_w, f)
    rank, _ = rank_in_expert(idx.reshape(-1), 4)
    kept = rank < C
    assert counters.tolist() == [T * 2, int((~kept).sum())] and counters[1] > 0
    assert (y.double() - reference(x, idx, gate_w * kept.view(T, 2), f)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["padded", "dense_experts", "masked_loop"])
def test_swiglu_gradients_match_the_seed_loop(name):
    idx, gate_w, g = routing(10, 4, 2, seed=8)
    x = torch.randn(10, 16, generator=g)
    grads = {}
    for strategy in (name, "active_loop"):
        f = swiglu(variant="gpt_oss")
        params = [t.requires_grad_() for t in f if isinstance(t, torch.Tensor)]
        STRATEGIES[strategy](x, idx, gate_w, f).square().sum().backward()
        grads[strategy] = [p.grad for p in params]
    for a, b in zip(grads[name], grads["active_loop"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_relu_family_keeps_the_seed_name_and_math():
    assert ExpertStack is ReluMLPExperts
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 8, 4, generator=g), torch.randn(3, 2, 8, generator=g))
    b = (torch.randn(3, 8, generator=g), torch.randn(3, 2, generator=g))
    x = torch.randn(5, 4, generator=g)
    ex = ExpertStack(w, b)
    assert ex.num_experts == 3 and ex.out_dim == 2
    torch.testing.assert_close(ex.run_one(1, x), F.linear(F.relu(F.linear(x, w[0][1], b[0][1])), w[1][1], b[1][1]))


def test_unknown_activation_is_named():
    f = swiglu()._replace(act="gelu")
    with pytest.raises(ValueError, match="unknown SwiGLU activation 'gelu'"):
        f.run_one(0, torch.randn(2, 16))


def test_gpt_oss_experts_copy_one_to_one_from_transformers():
    """transformers 5 stores gpt-oss's experts transposed ([E, d, 2I], [E, I, d]) with gate/up interleaved: the
    family takes the transposed views as they are (no copy) and matches GptOssExperts' own forward."""
    tf = pytest.importorskip("transformers", reason="transformers not installed: the 1:1 check needs it")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(0)
    cfg = tf.GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"  # its plain loop, and no warning about a standalone experts module
    hf = GptOssExperts(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=1.0)  # large enough that the clamps at 7 engage
    f = SwiGLUExperts(hf.gate_up_proj.transpose(1, 2), hf.down_proj.transpose(1, 2), hf.gate_up_proj_bias,
                      hf.down_proj_bias, "gpt_oss", cfg.swiglu_limit, cfg.swiglu_alpha, interleaved=True)
    assert f.gate_up.data_ptr() == hf.gate_up_proj.data_ptr()
    idx, gate_w, g = routing(11, 4, 2, seed=9)
    x = torch.randn(11, 16, generator=g)
    with torch.no_grad():
        want = hf(x, idx, gate_w)
        for name in EXACT:
            torch.testing.assert_close(STRATEGIES[name](x, idx, gate_w, f), want, atol=1e-4, rtol=1e-4)
