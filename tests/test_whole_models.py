"""Whole-model presets: published dimensions and parameter counts, the layers=N pattern, the memory a run needs,
and models built from them (scaled down) that run."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[test]')")

from moe_energy.errors import ConfigError  # noqa: E402
from moe_energy.models.archs import PRESETS  # noqa: E402
from moe_energy.models.whole import (  # noqa: E402
    MODELS,
    build_model,
    config_for,
    extrapolation_scale,
    get_model,
    kv_bytes_per_token,
    memory_bytes,
    models,
    param_counts,
    tiny,
)

MOE = ["olmoe-1b-7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b", "deepseek-v2-lite", "gpt-oss-20b"]
DENSE = ["olmo-2-7b", "olmo-2-1b", "qwen3-32b", "qwen3-14b", "qwen3-4b", "qwen3-8b", "mistral-7b", "llama-3.1-70b"]
SIBLINGS = {"olmoe-1b-7b": ("olmo-2-7b", "olmo-2-1b"), "qwen3-30b-a3b": ("qwen3-32b", "qwen3-14b", "qwen3-4b"),
            "qwen3-235b-a22b": ("qwen3-32b", "qwen3-14b", "qwen3-4b"), "mixtral-8x7b": ("mistral-7b", "llama-3.1-70b"),
            "deepseek-v2-lite": ("qwen3-8b",), "gpt-oss-20b": ("qwen3-8b",)}
# (layers, d_model, heads, kv_heads, head_dim, vocab, max positions, dense FFN width, tied) from each config.json
TABLE = {
    "olmoe-1b-7b": (16, 2048, 16, 16, 128, 50304, 4096, 0, False),
    "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 151936, 40960, 0, False),
    "qwen3-235b-a22b": (94, 4096, 64, 4, 128, 151936, 40960, 0, False),
    "mixtral-8x7b": (32, 4096, 32, 8, 128, 32000, 32768, 0, False),
    "deepseek-v2-lite": (27, 2048, 16, 16, 192, 102400, 163840, 10944, False),
    "gpt-oss-20b": (24, 2880, 64, 8, 64, 201088, 131072, 0, False),
    "olmo-2-7b": (32, 4096, 32, 32, 128, 100352, 4096, 11008, False),
    "olmo-2-1b": (16, 2048, 16, 16, 128, 100352, 4096, 8192, False),
    "qwen3-32b": (64, 5120, 64, 8, 128, 151936, 40960, 25600, False),
    "qwen3-14b": (40, 5120, 40, 8, 128, 151936, 40960, 17408, False),
    "qwen3-8b": (36, 4096, 32, 8, 128, 151936, 40960, 12288, False),
    "qwen3-4b": (36, 2560, 32, 8, 128, 151936, 40960, 9728, True),
    "mistral-7b": (32, 4096, 32, 8, 128, 32000, 32768, 14336, False),
    "llama-3.1-70b": (80, 8192, 64, 8, 128, 128256, 131072, 28672, False),
}
# Where the publisher printed two significant digits and our exact count is more than 1 % from that figure but
# within one unit of its last digit (3.35B printed as "3.3B"): the rounding, not a wrong shape.
ROUNDED = {("qwen3-30b-a3b", "active"), ("olmoe-1b-7b", "active"), ("deepseek-v2-lite", "active")}


def test_every_preset_is_listed_with_its_siblings():
    assert set(models()) == set(MOE) | set(DENSE) == set(TABLE)
    for name, sibs in SIBLINGS.items():
        assert get_model(name).siblings == sibs and all(s in MODELS for s in sibs)
    assert all(get_model(n).moe_arch is None and get_model(n).siblings == () for n in DENSE)


@pytest.mark.parametrize("name", list(TABLE))
def test_published_dimensions(name):
    m = get_model(name)
    got = (m.layers, m.d_model, m.heads, m.kv_heads, m.head_dim, m.vocab, m.max_positions, m.ffn_dim,
           m.tied_embeddings)
    assert got == TABLE[name]
    assert m.source.startswith("huggingface.co/") and "config.json" in m.source
    assert m.published is not None and m.published.where


@pytest.mark.parametrize("name", MOE)
def test_moe_layers_are_their_arch_preset(name):
    m = get_model(name)
    a = m.arch
    assert a is PRESETS[name] and a.d_model == m.d_model
    assert (m.moe_layers, len(m.dense_layers)) == (a.moe_layers, a.dense_layers)
    if a.dense_layers:
        assert m.ffn_dim == a.dense_ffn_dim


def _figure(s: str) -> tuple[float, float]:
    """'30.5B' -> (30.5e9, 0.1e9): the value and one unit of its last printed digit."""
    num = re.fullmatch(r"(\d+)(?:\.(\d+))?B", s)
    assert num, s
    decimals = len(num.group(2) or "")
    return float(s[:-1]) * 1e9, 10.0 ** -decimals * 1e9


@pytest.mark.parametrize("name", list(TABLE))
def test_param_counts_match_the_published_figures(name):
    m = get_model(name)
    total, active = param_counts(m)
    if m.published.active_counts == "output":  # their active figure leaves the input embedding out
        active -= m.vocab * m.d_model
    for what, got in (("total", total), ("active", active)):
        want, unit = _figure(getattr(m.published, what))
        off = abs(got - want)
        if (name, what) in ROUNDED:
            assert 0.01 * want < off <= unit, f"{name} {what}: {got / 1e9:.3f}B vs {want / 1e9}B"
        else:
            assert off <= 0.01 * want, f"{name} {what}: {got / 1e9:.3f}B vs {want / 1e9}B"
    if m.moe_arch is None:
        assert total == active + (m.vocab * m.d_model if m.published.active_counts == "output" else 0)


def test_known_exact_counts():
    # Mixtral: 2 x 32000 x 4096 embeddings + 32 x (attention 41.9M + 8 experts 3 x 4096 x 14336 + router + norms)
    attn = 2 * 4096 * 4096 + 2 * 4096 * 1024
    layer = attn + 8 * 3 * 4096 * 14336 + 4096 * 8 + 2 * 4096
    total, active = param_counts("mixtral-8x7b")
    assert total == 2 * 32000 * 4096 + 32 * layer + 4096
    assert total - active == 32 * 6 * 3 * 4096 * 14336
    # Qwen3-4B ties its head to the embedding: counted once
    assert param_counts("qwen3-4b")[0] == pytest.approx(4.022e9, rel=1e-3)


def test_layers_keep_the_pattern():
    gpt = config_for("gpt-oss-20b", 3)
    assert gpt.num_hidden_layers == 3 and gpt.layer_types == ["sliding_attention", "full_attention",
                                                              "sliding_attention"]
    assert config_for("gpt-oss-20b").layer_types[:4] == ["sliding_attention", "full_attention"] * 2
    ds = config_for("deepseek-v2-lite", 4)
    assert (ds.num_hidden_layers, ds.first_k_dense_replace) == (4, 1)
    assert config_for("qwen3-30b-a3b", 2).mlp_only_layers == []
    # a prefix: N layers count exactly as the first N layers of the full model, and more layers add MoE layers
    total1, active1 = param_counts("deepseek-v2-lite", 1)
    total2, active2 = param_counts("deepseek-v2-lite", 2)
    assert total1 == active1  # the first layer is dense
    assert total2 - total1 > active2 - active1 > 0


def test_layers_n_counts_what_a_built_model_holds():
    m = tiny("deepseek-v2-lite", layers=3)
    for n in (1, 2, 3):
        model = build_model(m, layers=n)
        assert sum(p.numel() for p in model.parameters()) == param_counts(m, n)[0]
        mlps = [type(layer.mlp).__name__ for layer in model.model.layers]
        assert mlps == ["DeepseekV2MLP"] + ["DeepseekV2Moe"] * (n - 1)


def test_extrapolation_scales_by_each_layers_matrix_work_and_the_head_share_of_the_phase():
    m = tiny("deepseek-v2-lite", layers=3)  # a dense first layer, then MoE layers
    model = build_model(m)
    a = m.arch
    work = []
    for layer in model.model.layers:  # each layer's parameters less the routed experts a token skips
        routed = sum(p.numel() for n_, p in layer.named_parameters() if ".experts." in n_)
        work.append(sum(p.numel() for p in layer.parameters()) - routed * (a.experts - a.top_k) // a.experts)
    head = model.lm_head.weight.numel()
    assert work[0] != work[1]  # the dense layer and an MoE layer weigh differently
    assert extrapolation_scale(m, 1, "decode", 8) == pytest.approx((sum(work) + head) / (work[0] + head))
    assert extrapolation_scale(m, 2, "prefill", 8) == pytest.approx((sum(work) + head / 8) / (sum(work[:2]) + head / 8))
    assert extrapolation_scale(m, 3, "decode", 8) == 1.0


def test_a_dense_7b_built_on_one_layer_extrapolates_by_about_its_layer_count():
    """The embeddings' weight (820 M of a 1-layer olmo-2-7b's 1.03 B parameters) is no work: a parameter ratio
    (~7x) would understate the whole model's prefill cost by ~4x."""
    assert 30 < extrapolation_scale("olmo-2-7b", 1, "prefill", 512) < 32
    assert 10 < extrapolation_scale("olmo-2-7b", 1, "decode", 512) < 32
    total = param_counts("olmo-2-7b")[0] / param_counts("olmo-2-7b", 1)[0]
    assert total < 8


@pytest.mark.parametrize("name", MOE)
def test_active_counts_leave_out_the_unused_routed_experts(name):
    m = tiny(name)
    model = build_model(m)
    total, active = param_counts(m)
    a = m.arch
    routed = sum(p.numel() for n_, p in model.named_parameters() if ".mlp.experts." in n_)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == routed * (a.experts - a.top_k) // a.experts


@pytest.mark.parametrize("name", list(TABLE))
def test_tiny_builds_and_runs(name):
    m = tiny(name)
    model = build_model(m, seed=1)
    assert type(model).__name__ == get_model(name).model_class
    assert type(model.config).__name__ == get_model(name).config_class
    ids = torch.randint(0, m.vocab, (2, 5), generator=torch.Generator().manual_seed(0))  # [B, L]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits  # [B, L, V]
    assert logits.shape == (2, 5, m.vocab) and torch.isfinite(logits).all()
    again = build_model(m, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_build_in_bfloat16_keeps_deepseeks_router_in_fp32_and_counts_its_bytes():
    m = tiny("deepseek-v2-lite")
    model = build_model(m, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj"] == torch.bfloat16
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory_bytes(m, None, "bfloat16", 1, 8)["weights"] == held


def test_memory_bytes_kv_cache_and_allowance():
    mem = memory_bytes("qwen3-30b-a3b", None, "bfloat16", 8, 4096)
    assert mem["kv_cache"] == 8 * 4097 * 48 * 2 * 4 * 128 * 2  # B x (L+1) x layers x K,V x kv heads x hd x bytes
    assert mem["weights"] == param_counts("qwen3-30b-a3b")[0] * 2
    assert mem["total"] == mem["weights"] + mem["kv_cache"] + mem["activations"] > 0
    # MLA caches the latent and the rope key: 576 values a token, not 2 x 16 heads x 192
    assert kv_bytes_per_token("deepseek-v2-lite", "bfloat16") == (512 + 64) * 2
    # gpt-oss: the sliding half of the layers holds 128 tokens whatever the context
    gpt = memory_bytes("gpt-oss-20b", None, "bfloat16", 1, 1000)["kv_cache"]
    assert gpt == (12 * 1001 + 12 * 128) * kv_bytes_per_token("gpt-oss-20b", "bfloat16")
    # fewer layers: less of everything but the embeddings
    small = memory_bytes("qwen3-30b-a3b", 4, "bfloat16", 8, 4096)
    assert small["weights"] < mem["weights"] and small["kv_cache"] * 12 == mem["kv_cache"]


@pytest.mark.parametrize("name", ["qwen3-8b", "gpt-oss-20b", "deepseek-v2-lite", "olmoe-1b-7b"])
def test_the_activations_hold_the_prefills_own_cache_of_every_layer_built(name):
    """A prefill (use_cache, as serving does) holds B x L tokens' keys and values in every layer built until its
    forward ends (a sliding layer's window is a view of them all); the allowance once left them out, so it did not
    grow with the layers: qwen3-32b at B 64, L 2048 in bf16 held a 32 GiB cache beside a 28.8 GiB allowance."""
    m = tiny(name, layers=3)
    model = build_model(m, seed=0)
    B, L = 2, 12
    with torch.inference_mode():
        cache = model(input_ids=torch.randint(0, m.vocab, (B, L)), use_cache=True, logits_to_keep=1).past_key_values
    held = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))  # bytes
    assert held == B * L * 3 * kv_bytes_per_token(m, "float32")
    grows = memory_bytes(m, 3, "float32", B, L)["activations"] - memory_bytes(m, 1, "float32", B, L)["activations"]
    assert grows == held * 2 // 3  # two more layers' caches


@pytest.mark.parametrize("name", ["olmo-2-7b", "qwen3-30b-a3b", "gpt-oss-20b"])
def test_a_decode_steps_allowance_is_its_own_not_its_contexts_prefill(name):
    """A decode step at (B, L) passes B tokens (its B x (L+1) cache is ``kv_cache``); before its windows, one prompt
    of L tokens fills a one-row cache. The allowance was the B x L prefill's: olmo-2-7b's one layer at B 16, L 512
    in fp32 said 2.39 GiB where the step and its fill need 0.15 GiB."""
    B, L, n = 16, 512, 1
    pre = memory_bytes(name, n, "float32", B, L, "prefill")["activations"]
    dec = memory_bytes(name, n, "float32", B, L, "decode")
    one_row = dec["kv_cache"] // B
    # the fill: a one-prompt prefill whose cache has L + 1 slots (a sliding layer its window), not L
    one_prompt = memory_bytes(name, n, "float32", 1, L, "prefill")["activations"]
    assert dec["activations"] == one_prompt - L * n * kv_bytes_per_token(name, "float32") + one_row
    assert dec["activations"] * 10 < pre
    # past L sequences the step itself decides: each one more adds one token's activations and its fp32 logits
    token = memory_bytes(name, n, "float32", 1, L + 1, "prefill")["activations"] - one_prompt \
        - n * kv_bytes_per_token(name, "float32")
    big = [memory_bytes(name, n, "float32", b, 8, "decode")["activations"] for b in (4096, 4097)]
    assert big[1] - big[0] == token + get_model(name).vocab * 4
    # unnamed, the phase is both: the larger allowance
    assert memory_bytes(name, n, "float32", B, L)["activations"] == pre


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: get_model("qwen3"), "model 'qwen3' is unknown; choose from olmoe-1b-7b"),
    (lambda: config_for("qwen3-8b", 0), "layers=0 must be a whole number from 1 to 36"),
    (lambda: param_counts("qwen3-8b", 37), "layers=37 must be a whole number from 1 to 36"),
    (lambda: build_model("mixtral-8x7b", layers=2.5), "layers=2.5"),
    (lambda: memory_bytes("olmoe-1b-7b", None, "bfloat16", 1, 4096), "context=4096 must be a whole number from 1 "
                                                                     "to 4095"),
    (lambda: memory_bytes("olmoe-1b-7b", None, "bfloat16", 0, 16), "batch=0"),
    (lambda: memory_bytes("olmoe-1b-7b", None, "fp8", 1, 16), "dtype='fp8' is unknown"),
    (lambda: memory_bytes("olmoe-1b-7b", None, "float32", 1, 16, "train"), "phase 'train' is unknown"),
])
def test_mistakes_are_one_line_config_errors(call, needle):
    with pytest.raises(ConfigError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)
