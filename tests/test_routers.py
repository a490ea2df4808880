"""The LLM routers against transformers' own router code (same weights, same inputs), and their contracts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_energy.errors import ConfigError
from moe_energy.models.archs import PRESETS
from moe_energy.models.routers import (
    ROUTERS,
    DbrxRouter,
    DeepseekV2Router,
    SigmoidGroupRouter,
    SoftmaxTopKRouter,
    TopKSoftmaxRouter,
    build_router,
)

D = 64
NO_HF = "transformers is not installed (pip install -e '.[test]' installs the pinned 5.24.0)"


def _hf(model: str):
    """transformers' modeling and configuration modules of ``model``, or skip the test saying why."""
    modeling = pytest.importorskip(f"transformers.models.{model}.modeling_{model}", reason=NO_HF)
    config = pytest.importorskip(f"transformers.models.{model}.configuration_{model}", reason=NO_HF)
    return modeling, config


def _plain(hf_router):
    """transformers' TopKRouter modules return (logits, weights, indices)."""
    def route(x):
        _, w, idx = hf_router(x)
        return idx, w
    return route


def case_softmax(model: str, cls: str, cfg: str, normalize: bool, **extra):
    modeling, config = _hf(model)
    kw = dict(hidden_size=D, num_experts_per_tok=2, **extra)
    kw["num_local_experts" if model == "mixtral" else "num_experts"] = 8
    hf = getattr(modeling, cls)(getattr(config, cfg)(**kw))
    return SoftmaxTopKRouter(D, 8, 2, normalize=normalize), hf, _plain(hf)


def case_dbrx():
    modeling, config = _hf("dbrx")
    ffn = modeling.DbrxFFN(config.DbrxConfig(d_model=D, n_heads=4, ffn_config={
        "ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2, "moe_normalize_expert_weights": 1.0}))

    def route(x):
        w, idx = ffn.route_tokens_to_experts(ffn.router(x))
        return idx, w
    return DbrxRouter(D, 8, 2, normalize=True), ffn.router, route


def case_deepseek_v2(n_group: int, topk_group: int, scaling: float):
    modeling, config = _hf("deepseek_v2")
    method = "group_limited_greedy" if n_group > 1 else "greedy"
    hf = modeling.DeepseekV2TopkRouter(config.DeepseekV2Config(
        hidden_size=D, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4, topk_method=method,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling))
    ours = DeepseekV2Router(D, 16, 4, scaling=scaling, n_group=n_group, topk_group=topk_group)
    return ours, hf, _plain(hf)


def case_deepseek_v3(n_group: int, topk_group: int, normalize: bool, scaling: float):
    modeling, config = _hf("deepseek_v3")
    hf = modeling.DeepseekV3TopkRouter(config.DeepseekV3Config(
        hidden_size=D, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=normalize, routed_scaling_factor=scaling))
    ours = SigmoidGroupRouter(D, 16, 4, n_group=n_group, topk_group=topk_group, normalize=normalize,
                              scaling=scaling)
    with torch.no_grad():
        ours.e_score_correction_bias.normal_(0.0, 0.1)  # a trained model's bias: it must change the choice
    return ours, hf, _plain(hf)


def case_gpt_oss():
    modeling, config = _hf("gpt_oss")
    hf = modeling.GptOssTopKRouter(config.GptOssConfig(hidden_size=D, num_local_experts=8, num_experts_per_tok=2))
    ours = TopKSoftmaxRouter(D, 8, 2)
    with torch.no_grad():
        ours.bias.normal_()
    return ours, hf, _plain(hf)


CASES = {
    "mixtral": lambda: case_softmax("mixtral", "MixtralTopKRouter", "MixtralConfig", True),
    "qwen2-moe": lambda: case_softmax("qwen2_moe", "Qwen2MoeTopKRouter", "Qwen2MoeConfig", False),
    "qwen3-moe": lambda: case_softmax("qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", True,
                                      norm_topk_prob=True),
    "olmoe": lambda: case_softmax("olmoe", "OlmoeTopKRouter", "OlmoeConfig", False),
    "dbrx": case_dbrx,
    "deepseek-v2-greedy": lambda: case_deepseek_v2(1, 1, 1.0),
    "deepseek-v2-group-limited": lambda: case_deepseek_v2(4, 2, 16.0),
    "deepseek-v3": lambda: case_deepseek_v3(4, 2, True, 2.5),
    "deepseek-v3-one-group-no-renorm": lambda: case_deepseek_v3(1, 1, False, 1.0),
    "gpt-oss": case_gpt_oss,
}


def by_expert(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (indices, weights) sorted by expert: the k chosen compared as sets, weights paired."""
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("name", list(CASES))
def test_router_matches_transformers_fp32(name):
    torch.manual_seed(0)
    ours, hf, route = CASES[name]()
    hf.load_state_dict(ours.state_dict())  # strict: the same names and shapes, 1:1
    x = 2.0 * torch.randn(96, D)
    idx, w = ours(x)
    with torch.no_grad():
        hf_idx, hf_w = route(x)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == w.shape == (96, ours.top_k)
    idx, w = by_expert(idx, w)
    hf_idx, hf_w = by_expert(hf_idx, hf_w)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_router_matches_transformers_bf16(name):
    """bf16 activations: each router computes in the precision transformers uses (fp32 softmax, DBRX's bf16
    one, DeepSeek's fp32 weights), so the results agree exactly once transformers' fp32 weights are cast."""
    torch.manual_seed(1)
    ours, hf, route = CASES[name]()
    hf.load_state_dict(ours.state_dict())
    if not name.startswith("deepseek"):  # transformers keeps DeepSeek's gate in fp32 (_keep_in_fp32_modules)
        hf.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    x = (2.0 * torch.randn(96, D)).bfloat16()
    idx, w = ours(x)
    with torch.no_grad():
        hf_idx, hf_w = route(x)
    assert w.dtype == torch.bfloat16
    idx, w = by_expert(idx, w)
    hf_idx, hf_w = by_expert(hf_idx, hf_w.to(torch.bfloat16))
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [DeepseekV2Router, SigmoidGroupRouter])
def test_deepseek_router_state_stays_fp32_when_cast(cls):
    r = cls(D, 16, 4)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        cast(r)
        assert all(t.dtype == torch.float32 for t in (*r.parameters(), *r.buffers()))
    idx, w = r(torch.randn(5, D, dtype=torch.float16))
    assert w.dtype == torch.float16 and idx.dtype == torch.int64


def test_other_routers_cast_with_the_layer():
    r = SoftmaxTopKRouter(D, 8, 2).to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16


def _small(name: str):
    a = PRESETS[name]
    return replace(a, d_model=D, ffn_dim=32, experts=16, top_k=4, shared_width=32 if a.shared_experts else 0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_build_router_contract(name):
    """Every preset's router: k distinct in-range experts per token, weights in x's dtype, renormalised
    weights summing to the scaling factor, and group-limited choices inside topk_group groups."""
    arch = _small(name)
    torch.manual_seed(0)
    r = build_router(arch)
    assert isinstance(r, ROUTERS[arch.router.kind])
    x = torch.randn(200, D)
    idx, w = r(x)
    assert idx.shape == w.shape == (200, 4) and w.dtype == x.dtype
    assert ((idx >= 0) & (idx < 16)).all()
    assert (idx.sort(dim=-1).values.diff(dim=-1) > 0).all()  # distinct
    assert (w > 0).all()
    spec = arch.router
    if spec.normalize or spec.kind == "topk_softmax":
        torch.testing.assert_close(w.sum(-1), torch.full((200,), spec.scaling))
    if spec.n_group > 1:
        groups = idx // (16 // spec.n_group)
        assert max(len(set(row.tolist())) for row in groups) <= spec.topk_group


def test_selection_bias_changes_choice_not_weights():
    """DeepSeek-V3's bias steers which experts are picked; the weights are the unbiased sigmoid scores."""
    torch.manual_seed(0)
    r = SigmoidGroupRouter(D, 16, 2, normalize=False)
    x = torch.randn(50, D)
    with torch.no_grad():
        r.e_score_correction_bias[3] = 10.0
    idx, w = r(x)
    assert (idx == 3).any(dim=-1).all()
    scores = torch.sigmoid(x @ r.weight.T)
    torch.testing.assert_close(w, scores.gather(1, idx))


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: SoftmaxTopKRouter(D, 8, 9), "top_k=9 exceeds experts=8"),
        (lambda: SoftmaxTopKRouter(0, 8, 2), "d_model=0"),
        (lambda: SoftmaxTopKRouter(D, 8, 1.5), "top_k=1.5"),
        (lambda: SoftmaxTopKRouter(D, True, 1), "experts=True"),
        (lambda: DeepseekV2Router(D, 16, 4, n_group=3), "n_group=3 does not divide experts=16"),
        (lambda: DeepseekV2Router(D, 16, 4, n_group=4, topk_group=5), "topk_group=5 exceeds n_group=4"),
        (lambda: SigmoidGroupRouter(D, 16, 8, n_group=8, topk_group=2), "top_k=8 exceeds the 4 experts"),
        (lambda: SigmoidGroupRouter(D, 16, 4, scaling=0.0), "scaling=0.0"),
        (lambda: SigmoidGroupRouter(D, 16, 4, scaling=float("nan")), "scaling=nan"),
    ],
)
def test_router_arguments_are_checked_in_one_line(make, needle):
    with pytest.raises(ConfigError) as e:
        make()
    assert needle in str(e.value) and "\n" not in str(e.value)
