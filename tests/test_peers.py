"""transformers' own MoE block as a peer: built for an arch, holding the layer's weights 1:1, it computes the
same function as the MoELayer under every experts implementation this transformers offers."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from moe_energy.bench.peers import GPU_ONLY, build_peers
from moe_energy.models.archs import Arch, RouterSpec, custom_arch, get_arch
from moe_energy.models.families import family_for
from moe_energy.models.llm import MoELayer

D, INTER, E, K = 64, 32, 8, 2
SHAPES = {
    "qwen3_moe": custom_arch(D, INTER, E, K),  # softmax top-k, no renormalisation
    "mixtral": custom_arch(D, INTER, E, K, router=RouterSpec("softmax_topk", normalize=True)),
    "qwen2_moe": Arch("q2", D, INTER, E, K, shared_experts=1, shared_width=48, shared_gate=True),
    "deepseek_v2": custom_arch(D, INTER, E, K, shared_experts=2,
                               router=RouterSpec("deepseek_v2", scaling=2.0, n_group=2, topk_group=1)),
    "deepseek_v3": custom_arch(D, INTER, E, K, shared_experts=1,
                               router=RouterSpec("sigmoid_group", normalize=True, scaling=2.5, n_group=2,
                                                 topk_group=1)),
    # the presets scaled down: gpt-oss (biased router and experts, clamped SwiGLU), DBRX (L1-renormalised)
    "gpt_oss": dataclasses.replace(get_arch("gpt-oss-20b"), d_model=D, ffn_dim=INTER, experts=E, top_k=K),
    "dbrx": dataclasses.replace(get_arch("dbrx"), d_model=D, ffn_dim=INTER, experts=E, top_k=K),
    "dbrx_no_renorm": custom_arch(D, INTER, E, K, router=RouterSpec("dbrx", normalize=False)),
}
# transformers 5.24 wraps every experts class here in its implementation dispatch but DBRX's
EAGER_ONLY = {"dbrx", "dbrx_no_renorm"}


def layer_of(arch: Arch) -> MoELayer:
    """The layer with weights past its init (larger values make a wrongly copied weight show)."""
    m = MoELayer.from_arch(arch, strategy="grouped", seed=3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.2)
    return m.eval()


@pytest.mark.parametrize("family", list(SHAPES))
def test_every_offered_implementation_computes_the_layer(family):
    pytest.importorskip("transformers", reason="transformers not installed: the peers need it")
    m = layer_of(SHAPES[family])
    peers = build_peers(m)
    assert peers.reason is None and peers.family == family.removesuffix("_no_renorm")
    offered = {p.implementation for p in peers.available}
    # what transformers 5.24 runs on a CPU
    assert (offered == {"eager"}) if family in EAGER_ONLY else ({"eager", "batched_mm", "grouped_mm"} <= offered)
    for tokens in (1, 8):
        # 4x: gate_up values past gpt-oss's clamp at 7, so a wrong limit or alpha shows
        x = 4 * torch.randn(tokens, D, generator=torch.Generator().manual_seed(tokens))
        with torch.inference_mode():
            want = m(x)
            for p in peers.available:
                torch.testing.assert_close(p(x), want, atol=1e-4, rtol=1e-4, msg=lambda s, n=p.name: f"{n}: {s}")


def test_peers_share_one_copy_of_the_layer_weights():
    pytest.importorskip("transformers", reason="transformers not installed: the peers need it")
    m = layer_of(SHAPES["qwen2_moe"])
    peers = build_peers(m).available
    ptrs = {p.block.experts.gate_up_proj.data_ptr() for p in peers}
    assert len(ptrs) == 1 and m.experts.gate_up_proj.data_ptr() not in ptrs  # one copy, not the layer's own
    assert all(p.block.shared_expert_gate.weight.data_ptr() == peers[0].block.shared_expert_gate.weight.data_ptr()
               for p in peers)


def test_gpu_kernels_are_a_reason_on_a_cpu_not_an_error():
    pytest.importorskip("transformers", reason="transformers not installed: the peers need it")
    peers = build_peers(layer_of(SHAPES["qwen3_moe"]))
    reasons = {p.implementation: p.reason for p in peers.peers}
    for impl, why in GPU_ONLY.items():
        if impl in reasons:
            assert reasons[impl] == why
    assert peers.as_dict()["implementations"]["eager"] is None


def test_gpt_oss_peer_holds_transformers_storage_and_the_layer_clamp():
    """gpt-oss's experts are stored transposed in transformers: the peer gets contiguous [E, d, 2I] / [E, I, d]
    copies (what a checkpoint loads), and the config's SwiGLU limit and alpha are the layer's."""
    pytest.importorskip("transformers", reason="transformers not installed: the peers need it")
    m = layer_of(SHAPES["gpt_oss"])
    ex = build_peers(m, only=["eager"]).available[0].block.experts
    assert ex.gate_up_proj.shape == (E, D, 2 * INTER) and ex.down_proj.shape == (E, INTER, D)
    assert ex.gate_up_proj.is_contiguous() and ex.down_proj.is_contiguous()
    assert torch.equal(ex.gate_up_proj, m.experts.gate_up_proj.transpose(1, 2))
    assert (ex.limit, ex.alpha) == (m.experts.limit, m.experts.alpha)


def test_dbrx_offers_eager_only_and_says_why_not_the_others():
    pytest.importorskip("transformers", reason="transformers not installed: the peers need it")
    peers = build_peers(layer_of(SHAPES["dbrx"]))
    reasons = {p.implementation: p.reason for p in peers.peers}
    assert reasons.pop("eager") is None and {"batched_mm", "grouped_mm"} <= set(reasons)
    assert all("DbrxExperts has only its eager forward" in why for why in reasons.values())


@pytest.mark.parametrize(("preset", "family"), [("qwen3-30b-a3b", "qwen3_moe"), ("olmoe-1b-7b", "olmoe"),
                                                ("mixtral-8x7b", "mixtral"), ("qwen1.5-moe-a2.7b", "qwen2_moe"),
                                                ("deepseek-v2-lite", "deepseek_v2"), ("deepseek-v3", "deepseek_v3"),
                                                ("gpt-oss-20b", "gpt_oss"), ("gpt-oss-120b", "gpt_oss"),
                                                ("dbrx", "dbrx")])
def test_each_preset_gets_its_own_block(preset, family):
    f, why = family_for(get_arch(preset))
    assert f is not None and f.name == family and why == ""


@pytest.mark.parametrize("arch", [Arch("silu-biased", D, INTER, E, K, expert_bias=True),
                                  Arch("oss-unbiased", D, INTER, E, K, act="gpt_oss",
                                       router=RouterSpec("topk_softmax")),
                                  custom_arch(D, INTER, E, K, router=RouterSpec("sigmoid_group"))])
def test_an_arch_without_a_mapped_block_is_a_one_line_reason(arch):
    f, why = family_for(arch)
    assert f is None and arch.name in why and "\n" not in why


def test_missing_transformers_is_a_reason_not_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    peers = build_peers(layer_of(SHAPES["qwen3_moe"]))
    assert peers.peers == [] and peers.available == []
    assert "transformers is not installed" in peers.reason and "\n" not in peers.reason
    assert peers.as_dict()["unavailable"] == peers.reason


def _edge(name: str, experts: int = E, top_k: int = K, **kw) -> Arch:
    """A tiny arch named after a preset, so family_for gives that preset's block."""
    if name.startswith("gpt-oss"):
        return dataclasses.replace(get_arch("gpt-oss-20b"), name=name, d_model=D, ffn_dim=INTER, experts=experts,
                                   top_k=top_k)
    return Arch(name, D, INTER, experts, top_k, **kw)


_V2 = dict(shared_experts=2, shared_width=INTER)
_V3 = dict(shared_experts=1, shared_width=INTER)
EDGES = {  # the router options and shapes where a layer could part from transformers' block
    "qwen3_moe": _edge("qwen3-norm", router=RouterSpec("softmax_topk", normalize=True)),
    "olmoe": _edge("olmoe-norm", router=RouterSpec("softmax_topk", normalize=True)),
    "qwen2_moe": _edge("qwen1.5-norm", shared_experts=1, shared_width=48, shared_gate=True,
                       router=RouterSpec("softmax_topk", normalize=True)),
    "mixtral": _edge("mixtral-top1", top_k=1, router=RouterSpec("softmax_topk", normalize=True)),
    "deepseek_v2": _edge("deepseek-v2-all", 16, 16, **_V2,
                         router=RouterSpec("deepseek_v2", scaling=16.0, n_group=4, topk_group=4)),
    "deepseek_v3": _edge("deepseek-v3-plain", 16, 4, **_V3,
                         router=RouterSpec("sigmoid_group", scaling=2.5, n_group=4, topk_group=2)),
    "gpt_oss": _edge("gpt-oss-all", top_k=E),
}


@pytest.mark.parametrize("family", list(EDGES))
def test_every_strategy_computes_the_block_at_the_router_edges(family):
    """norm_topk_prob on where the class default is off (and off for DeepSeek-V3), top-1, top_k = E, a trained
    selection bias: every strategy gives transformers' output at 1, 3 and 64 tokens."""
    pytest.importorskip("transformers", reason="transformers not installed: the peers need it")
    from moe_energy.models.strategies import STRATEGIES
    from moe_energy.runner import prepare  # noqa: F401 - installs strategy auto's timing probe

    m = layer_of(EDGES[family])
    m.capacity_factor = 1e6  # padded_capacity drops nothing
    if family == "deepseek_v3":
        with torch.no_grad():
            m.router.e_score_correction_bias.normal_(std=0.3)
    peers = build_peers(m, only=["eager"])
    assert peers.family == family
    for tokens in (1, 3, 64):
        x = 4 * torch.randn(tokens, D, generator=torch.Generator().manual_seed(tokens))
        with torch.inference_mode():
            want = peers.available[0](x)
            for s in STRATEGIES:
                m.strategy = s
                torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()),
                                           msg=lambda e, s=s, t=tokens: f"{s} at {t} tokens: {e}")
