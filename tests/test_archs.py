"""LLM MoE layer presets and their arithmetic: counts against transformers' own modules, the dense SwiGLU
baselines, the expected experts a batch touches, and `moe-energy archs`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from moe_energy.cli import main
from moe_energy.errors import ConfigError
from moe_energy.models.archs import PRESETS, Arch, RouterSpec, custom_arch, get_arch
from moe_energy.models.counting import (
    expected_experts_touched,
    layer_active_params,
    layer_flops,
    layer_params,
    layer_weight_bytes,
    llm_expert_params,
    router_params,
    shared_params,
    swiglu_params,
)
from moe_energy.models.dense import DenseSwiGLU, matched_swiglu, swiglu_width

NO_HF = "transformers is not installed (pip install -e '.[test]' installs the pinned 5.24.0)"

# The issue's table: (d, I, E, k, shared count, shared width, MoE layers); every value checked against the
# checkpoint's config.json (see each preset's source).
TABLE = {
    "mixtral-8x7b": (4096, 14336, 8, 2, 0, 0, 32),
    "mixtral-8x22b": (6144, 16384, 8, 2, 0, 0, 56),
    "dbrx": (6144, 10752, 16, 4, 0, 0, 40),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, 1, 5632, 24),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0, 0, 48),
    "qwen3-235b-a22b": (4096, 1536, 128, 8, 0, 0, 94),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 0, 0, 16),
    "deepseek-v2-lite": (2048, 1408, 64, 6, 2, 1408, 26),
    "deepseek-v3": (7168, 2048, 256, 8, 1, 2048, 58),
    "gpt-oss-20b": (2880, 2880, 32, 4, 0, 0, 24),
    "gpt-oss-120b": (2880, 2880, 128, 4, 0, 0, 36),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_match_the_issue_table(name):
    a = PRESETS[name]
    assert (a.d_model, a.ffn_dim, a.experts, a.top_k, a.shared_experts, a.shared_width, a.moe_layers) == TABLE[name]
    assert a.source.startswith("huggingface.co/")


def test_preset_routers():
    r = {n: a.router for n, a in PRESETS.items()}
    assert r["mixtral-8x7b"] == RouterSpec("softmax_topk", normalize=True)
    assert r["qwen1.5-moe-a2.7b"] == r["olmoe-1b-7b"] == RouterSpec("softmax_topk", normalize=False)
    assert r["qwen3-30b-a3b"].normalize and r["dbrx"] == RouterSpec("dbrx", normalize=True)
    assert r["deepseek-v2-lite"] == RouterSpec("deepseek_v2", scaling=1.0)
    assert r["deepseek-v3"] == RouterSpec("sigmoid_group", normalize=True, scaling=2.5, n_group=8, topk_group=4)
    assert r["gpt-oss-20b"] == RouterSpec("topk_softmax") and PRESETS["gpt-oss-20b"].expert_bias
    assert PRESETS["qwen1.5-moe-a2.7b"].shared_gate and not PRESETS["deepseek-v3"].shared_gate
    assert (PRESETS["deepseek-v3"].dense_layers, PRESETS["deepseek-v3"].dense_ffn_dim) == (3, 18432)


def test_known_layer_counts():
    # Mixtral-8x7B: router 4096 x 8 + 8 experts x 3 x 4096 x 14336
    assert layer_params(PRESETS["mixtral-8x7b"]) == 4096 * 8 + 8 * 3 * 4096 * 14336
    assert layer_active_params(PRESETS["mixtral-8x7b"]) == 4096 * 8 + 2 * 3 * 4096 * 14336
    # Qwen1.5-MoE: + one shared expert of 5632 and its Linear(2048, 1) gate
    q = PRESETS["qwen1.5-moe-a2.7b"]
    assert shared_params(q) == 3 * 2048 * 5632 + 2048
    # gpt-oss: router bias, expert biases 2I + d
    g = PRESETS["gpt-oss-20b"]
    assert router_params(g) == 2880 * 32 + 32 and llm_expert_params(g) == 3 * 2880 * 2880 + 2 * 2880 + 2880
    # DeepSeek-V3's whole-model MoE FFN parameters: ~657 B of its 671 B
    v3 = PRESETS["deepseek-v3"]
    assert 650e9 < v3.moe_layers * layer_params(v3) < 660e9


# -- the formula against transformers' modules at a small shape ----------------------------------------------
def _hf(model: str):
    modeling = pytest.importorskip(f"transformers.models.{model}.modeling_{model}", reason=NO_HF)
    config = pytest.importorskip(f"transformers.models.{model}.configuration_{model}", reason=NO_HF)
    return modeling, config


SMALL = dict(d_model=64, ffn_dim=32, experts=16, top_k=4)


def _block(name: str) -> nn.Module:
    """transformers' MoE block of ``name``'s family at d=64, I=32, E=16, k=4 (shared width 48 or 2/1 x 32)."""
    common = dict(hidden_size=64, num_experts_per_tok=4)
    if name.startswith("mixtral"):
        m, c = _hf("mixtral")
        return m.MixtralSparseMoeBlock(c.MixtralConfig(intermediate_size=32, num_local_experts=16, **common))
    if name == "dbrx":
        m, c = _hf("dbrx")
        return m.DbrxFFN(c.DbrxConfig(d_model=64, n_heads=4, ffn_config={
            "ffn_hidden_size": 32, "moe_num_experts": 16, "moe_top_k": 4}))
    if name.startswith("qwen1.5"):
        m, c = _hf("qwen2_moe")
        return m.Qwen2MoeSparseMoeBlock(c.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                         num_experts=16, **common))
    if name.startswith("qwen3"):
        m, c = _hf("qwen3_moe")
        return m.Qwen3MoeSparseMoeBlock(c.Qwen3MoeConfig(moe_intermediate_size=32, num_experts=16, **common))
    if name.startswith("olmoe"):
        m, c = _hf("olmoe")
        return m.OlmoeSparseMoeBlock(c.OlmoeConfig(intermediate_size=32, num_experts=16, **common))
    if name.startswith("deepseek-v2"):
        m, c = _hf("deepseek_v2")
        return m.DeepseekV2Moe(c.DeepseekV2Config(num_attention_heads=4, n_routed_experts=16, moe_intermediate_size=32,
                                                  n_shared_experts=2, **common))
    if name == "deepseek-v3":
        m, c = _hf("deepseek_v3")
        return m.DeepseekV3MoE(c.DeepseekV3Config(num_attention_heads=4, n_routed_experts=16, moe_intermediate_size=32,
                                                  n_shared_experts=1, n_group=8, topk_group=4, **common))
    m, c = _hf("gpt_oss")
    return m.GptOssMLP(c.GptOssConfig(intermediate_size=32, num_local_experts=16, **common))


def _small(name: str) -> Arch:
    a = PRESETS[name]
    width = (48 if a.shared_gate else 32) if a.shared_experts else 0
    return replace(a, shared_width=width, **SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_layer_counts_equal_transformers_modules(name):
    """Total and active counts of every router / shared-expert / bias variant, to the parameter."""
    block, arch = _block(name), _small(name)
    groups = {"router": 0, "experts": 0, "shared": 0}
    for pname, p in block.named_parameters():
        key = "experts" if pname.startswith("experts.") else "router" if pname.startswith(("gate.", "router.")) \
            else "shared"
        groups[key] += p.numel()
    assert sum(groups.values()) == layer_params(arch)
    assert groups["router"] == router_params(arch) and groups["shared"] == shared_params(arch)
    active = groups["router"] + groups["experts"] * arch.top_k // arch.experts + groups["shared"]
    assert active == layer_active_params(arch)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "deepseek-v3",
                                  "gpt-oss-20b", "dbrx"])
def test_layer_flops_equal_counted_flops_of_transformers_forward(name):
    """T tokens through transformers' block cost T x layer_flops (its matrix products, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    block, arch = _block(name), _small(name)
    for p in block.parameters():  # frozen: DBRX passes weight views as arguments, which the counter's hooks trace
        nn.init.normal_(p.requires_grad_(False), std=0.1)
    with torch.no_grad():
        x = torch.randn(1, 24, 64)
        with FlopCounterMode(display=False) as counter:
            block(x)
    assert counter.get_total_flops() == 24 * layer_flops(arch)


# -- dense SwiGLU baselines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("match", ["total", "active"])
def test_swiglu_width_is_smallest_reaching_target(name, match):
    a = PRESETS[name]
    target = layer_params(a) if match == "total" else layer_active_params(a)
    w = swiglu_width(a, match)
    assert swiglu_params(a.d_model, w) >= target > swiglu_params(a.d_model, w - 1)


def test_swiglu_width_rejects_unknown_match():
    with pytest.raises(ConfigError, match="match='both' is unknown"):
        swiglu_width(PRESETS["dbrx"], "both")  # type: ignore[arg-type]


def test_dense_swiglu_matches_transformers_mlp():
    m, c = _hf("qwen3_moe")
    torch.manual_seed(0)
    ours = DenseSwiGLU(64, 40)
    hf = m.Qwen3MoeMLP(c.Qwen3MoeConfig(hidden_size=64), intermediate_size=40)
    hf.load_state_dict(ours.state_dict())  # gate_proj, up_proj, down_proj: 1:1
    x = torch.randn(7, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in ours.parameters()) == ours.num_params == 3 * 64 * 40


def test_matched_swiglu_has_the_layers_width():
    arch = custom_arch(64, 32, 8, 2, shared_experts=1)
    dense = matched_swiglu(arch, "active")
    assert dense.width == swiglu_width(arch, "active") and dense(torch.randn(3, 64)).shape == (3, 64)
    assert dense.num_params >= layer_active_params(arch)


# -- expected experts touched and bytes read ------------------------------------------------------------------
@pytest.mark.parametrize("experts, top_k, tokens", [(16, 4, 1), (16, 4, 3), (16, 2, 8), (64, 8, 5), (8, 8, 2)])
def test_expected_experts_touched_matches_monte_carlo(experts, top_k, tokens):
    g = torch.Generator().manual_seed(0)
    trials = 20_000
    picks = torch.rand(trials, tokens, experts, generator=g).topk(top_k, dim=-1).indices  # uniform k-subsets
    hit = torch.zeros(trials, experts, dtype=torch.bool)
    hit.scatter_(1, picks.reshape(trials, -1), True)
    estimate = hit.sum(dim=1).double().mean().item()
    assert expected_experts_touched(experts, top_k, tokens) == pytest.approx(estimate, abs=0.05)


def test_expected_experts_touched_edges():
    assert expected_experts_touched(64, 8, 0) == 0.0
    assert expected_experts_touched(64, 8, 1) == pytest.approx(8.0)
    assert expected_experts_touched(8, 8, 3) == 8.0
    assert expected_experts_touched(256, 8, 10_000) == pytest.approx(256.0)
    with pytest.raises(ValueError):
        expected_experts_touched(8, 9, 1)


def test_layer_weight_bytes():
    a = PRESETS["qwen1.5-moe-a2.7b"]
    assert layer_weight_bytes(a, a.experts, 2) == 2 * layer_params(a)
    assert layer_weight_bytes(a, a.top_k, 2) == 2 * layer_active_params(a)
    assert layer_weight_bytes(a, 0, 1) == router_params(a) + shared_params(a)
    expected = layer_weight_bytes(a, expected_experts_touched(a.experts, a.top_k, 4), 2)
    assert layer_weight_bytes(a, 4, 2) < expected < layer_weight_bytes(a, 16, 2)
    with pytest.raises(ValueError):
        layer_weight_bytes(a, a.experts + 1, 2)


# -- custom shapes ----------------------------------------------------------------------------------------------
def test_custom_arch_defaults():
    a = custom_arch(256, 128, 16, 2, shared_experts=2, router="deepseek_v2")
    assert (a.shared_width, a.router, a.moe_layers, a.name) == (128, RouterSpec("deepseek_v2"), 1, "custom")
    assert custom_arch(256, 128, 16, 2).shared_width == 0
    assert get_arch("dbrx") is PRESETS["dbrx"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(d_model=0), "d_model=0 must be a whole number >= 1"),
        (dict(ffn_dim=1.5), "ffn_dim=1.5"),
        (dict(experts=True), "experts=True"),
        (dict(top_k=9), "top_k=9 exceeds experts=8"),
        (dict(shared_experts=-1), "shared_experts=-1"),
        (dict(router="hash"), "router='hash' is unknown"),
        (dict(router=RouterSpec("softmax_topk", n_group=2)), "needs a group-limited router"),
        (dict(router=RouterSpec("sigmoid_group", n_group=3)), "n_group=3 does not divide experts=8"),
        (dict(router=RouterSpec("sigmoid_group", n_group=4, topk_group=1)), "top_k=4 exceeds the 2 experts"),
        (dict(router=RouterSpec("deepseek_v2", normalize=True)), "normalize=True has no meaning"),
        (dict(router=RouterSpec("softmax_topk", scaling=2.0)), "scaling=2.0 needs a DeepSeek router"),
        (dict(router=RouterSpec("sigmoid_group", scaling=-1)), "scaling=-1"),
        (dict(shared_gate=True), "shared_gate=True needs shared_experts >= 1"),
        (dict(moe_layers=0), "moe_layers=0"),
        (dict(d_model=10**6, ffn_dim=10**6), "parameters per layer exceed"),
    ],
)
def test_custom_arch_mistakes_are_one_line_config_errors(kwargs, needle):
    args = dict(d_model=64, ffn_dim=32, experts=8, top_k=4) | kwargs
    with pytest.raises(ConfigError) as e:
        custom_arch(**args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_get_arch_unknown_names_choices():
    with pytest.raises(ConfigError, match="arch 'mixtral' is unknown; choose from mixtral-8x7b"):
        get_arch("mixtral")


# -- the command ----------------------------------------------------------------------------------------------
def test_archs_command_lists_every_preset(capsys):
    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 4 and cells[1] in PRESETS and cells[2].isdigit():
            rows[cells[1]] = cells
    assert set(rows) == set(PRESETS)
    for name, a in PRESETS.items():
        assert rows[name][2:4] == [str(a.experts), str(a.top_k)]
        assert f"{layer_params(a):,}" in rows[name] and f"{layer_active_params(a):,}" in rows[name]
        assert a.source.split(" ")[0] in out
