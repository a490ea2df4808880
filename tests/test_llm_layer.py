"""The LLM MoE layer: routed SwiGLU experts under every strategy plus shared experts, and transformers' own
blocks (Mixtral, Qwen2-MoE, DeepSeek-V3) copied in weight for weight give the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_energy.models.llm import MoELayer, SharedExperts
from moe_energy.models.strategies import STRATEGIES
from moe_energy.runner import prepare  # noqa: F401 - installs strategy auto's timing probe

D, INTER, E, K = 16, 8, 4, 2


class SoftmaxTopK(nn.Module):
    """A test router as Mixtral's and Qwen-MoE's: softmax over all E logits in fp32, top k, optionally
    renormalised over the k; ``weight`` [E, d] named as transformers names it."""

    def __init__(self, hidden: int, experts: int, k: int, norm_topk: bool = True) -> None:
        super().__init__()
        self.k, self.norm_topk = k, norm_topk
        self.weight = nn.Parameter(torch.randn(experts, hidden) / hidden**0.5)  # [E, d]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs = F.linear(x, self.weight).float().softmax(dim=-1)  # [T, E]
        top, idx = probs.topk(self.k, dim=-1)  # [T, k]
        if self.norm_topk:
            top = top / top.sum(dim=-1, keepdim=True)
        return idx, top.to(x.dtype)


class WrapRouter(nn.Module):
    """transformers' own router module (returning logits, weights, indices) as a MoELayer router."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, weights, idx = self.gate(x)
        return idx, weights.to(x.dtype)


def layer(shared: str = "none", strategy: str = "grouped", **kw) -> MoELayer:
    torch.manual_seed(0)
    width = {"none": 0, "plain": 24, "gated": 24}[shared]
    m = MoELayer(D, INTER, E, SoftmaxTopK(D, E, K), shared_intermediate=width, shared_gate=shared == "gated",
                 strategy=strategy, capacity_factor=E / K, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():  # past nn.Linear's init: larger values make a wrong formula show
            p.normal_(std=0.5)
    return m


def reference(m: MoELayer, x: Tensor) -> Tensor:
    """The layer by hand in float64: per token, per chosen expert, silu(gate x) * up x, then shared."""
    idx, w = m.router(x)
    ex = m.experts
    y = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(idx.shape[1]):
            gate, up = (ex.gate_up_proj[int(idx[t, j])].double() @ xt).chunk(2)
            y[t] += w[t, j].double() * (ex.down_proj[int(idx[t, j])].double() @ (F.silu(gate) * up))
        if m.shared is not None:
            s = m.shared
            h = F.silu(s.gate_proj.weight.double() @ xt) * (s.up_proj.weight.double() @ xt)
            out = s.down_proj.weight.double() @ h
            y[t] += out if s.gate is None else torch.sigmoid(s.gate.weight.double() @ xt) * out
    return y


@pytest.mark.parametrize("shared", ["none", "plain", "gated"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_layer_matches_a_reference_under_every_strategy(strategy, shared):
    m = layer(shared, strategy)
    x = torch.randn(13, D)
    with torch.inference_mode():
        y = m(x)
        assert y.shape == (13, D)
        torch.testing.assert_close(y.double(), reference(m, x), atol=1e-4, rtol=0)
        assert m(x[:0]).shape == (0, D)


def test_layer_records_auto_and_capacity_like_moe():
    m = layer("gated", "auto")
    x = torch.randn(20, D)
    with torch.inference_mode():
        m(x)
    info = m.strategy_info()
    assert info["resolved_strategy"] in info["auto_probe_ms"] and info["weight_layout"] == "out_in"
    m.strategy, m.capacity_factor = "padded_capacity", 0.5  # C = ceil(0.5 * 40 / 4) = 5 a expert
    m.reset_pair_counts()
    with torch.inference_mode():
        m(x)
    info = m.strategy_info()
    assert info["routed_pairs"] == 40 and info["dropped_pairs"] >= 20


def test_bad_arguments_name_the_layer():
    with pytest.raises(ValueError, match="MoELayer: strategy='fastest'"):
        layer(strategy="fastest")
    with pytest.raises(ValueError, match="act='relu'"):
        layer(act="relu")
    with pytest.raises(ValueError, match=r"hidden=16"):
        layer()(torch.randn(3, 5))
    with pytest.raises(TypeError, match="MoELayer: capacity_factor"):
        layer().capacity_factor = "big"


def test_gpt_oss_options_give_biases_and_the_clamped_activation():
    m = layer(expert_bias=True, act="gpt_oss", interleaved=True, limit=1.0)
    assert m.experts.gate_up_proj_bias.shape == (E, 2 * INTER) and m.experts.down_proj_bias.shape == (E, D)
    f = m.stack()
    assert (f.act, f.interleaved, f.limit, f.alpha) == ("gpt_oss", True, 1.0, 1.702)
    x = torch.randn(9, D)
    with torch.inference_mode():
        ys = {s: STRATEGIES[s](x, *m.router(x), m.stack()) for s in ("active_loop", "grouped", "grouped_fm")}
    torch.testing.assert_close(ys["grouped"], ys["active_loop"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ys["grouped_fm"], ys["active_loop"], atol=1e-4, rtol=0)


# --- transformers' own blocks, copied 1:1 -----------------------------------------------------------


def randomise(block: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.5)
    return block.eval()


def copy_shared(dst: SharedExperts, mlp: nn.Module, gate: nn.Module | None = None) -> None:
    dst.load_state_dict({**mlp.state_dict(), **({"gate.weight": gate.weight} if gate is not None else {})})


@pytest.mark.parametrize("strategy", ["grouped", "grouped_fm", "padded", "dense_experts", "active_loop"])
def test_mixtral_block_copies_one_to_one(strategy):
    tf = pytest.importorskip("transformers", reason="transformers not installed: the 1:1 check needs it")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = tf.MixtralConfig(hidden_size=D, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "eager"
    hf = randomise(MixtralSparseMoeBlock(cfg))
    m = MoELayer(D, INTER, E, SoftmaxTopK(D, E, K, norm_topk=True), strategy=strategy).eval()
    m.experts.load_state_dict(hf.experts.state_dict())  # same names, same shapes: no transpose, no split
    m.router.load_state_dict(hf.gate.state_dict())
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x.view(-1, D)), hf(x).view(-1, D), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["grouped", "grouped_fm", "padded_capacity", "auto"])
def test_qwen2_moe_block_with_gated_shared_expert_copies_one_to_one(strategy):
    tf = pytest.importorskip("transformers", reason="transformers not installed: the 1:1 check needs it")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = tf.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=INTER, shared_expert_intermediate_size=24,
                            num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
    cfg._experts_implementation = "eager"
    hf = randomise(Qwen2MoeSparseMoeBlock(cfg))
    m = MoELayer(D, INTER, E, SoftmaxTopK(D, E, K, norm_topk=False), shared_intermediate=24, shared_gate=True,
                 strategy=strategy, capacity_factor=E / K).eval()
    m.experts.load_state_dict(hf.experts.state_dict())
    m.router.load_state_dict(hf.gate.state_dict())
    copy_shared(m.shared, hf.shared_expert, hf.shared_expert_gate)
    x = torch.randn(1, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x.view(-1, D)), hf(x).view(-1, D), atol=1e-4, rtol=1e-4)


def test_deepseek_v3_block_with_shared_experts_copies_one_to_one():
    """DeepSeek's group-limited sigmoid router is transformers' own here (wrapped): the layer is what is checked."""
    tf = pytest.importorskip("transformers", reason="transformers not installed: the 1:1 check needs it")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = tf.DeepseekV3Config(hidden_size=D, moe_intermediate_size=INTER, n_routed_experts=E, n_shared_experts=2,
                              num_experts_per_tok=K, n_group=2, topk_group=1, routed_scaling_factor=2.5)
    cfg._experts_implementation = "eager"
    hf = randomise(DeepseekV3MoE(cfg))
    m = MoELayer(D, INTER, E, WrapRouter(hf.gate), shared_intermediate=2 * INTER).eval()
    m.experts.load_state_dict(hf.experts.state_dict())
    copy_shared(m.shared, hf.shared_experts)
    x = torch.randn(1, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x.view(-1, D)), hf(x).view(-1, D), atol=1e-4, rtol=1e-4)
