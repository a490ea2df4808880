"""swap_moe_blocks: a whole transformers model with its MoE blocks replaced by moe-energy's MoELayer on the very
same tensors gives the logits transformers' own blocks give, family by family."""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[test]')")

from moe_energy.errors import ConfigError  # noqa: E402
from moe_energy.models.strategies import STRATEGIES  # noqa: E402
from moe_energy.models.swap import SwappedMoE, swap_moe_blocks  # noqa: E402
from moe_energy.models.whole import build_model, tiny  # noqa: E402
from moe_energy.runner import prepare  # noqa: E402, F401 - installs strategy auto's timing probe

# every strategy that computes the layer exactly (padded_capacity drops the pairs past its capacity)
EXACT = [s for s in STRATEGIES if s != "padded_capacity"]
PRESETS = {"olmoe-1b-7b": 3, "qwen3-30b-a3b": 3, "mixtral-8x7b": 3, "deepseek-v2-lite": 2, "gpt-oss-20b": 3}
SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, eos_token_id=None)


def _other_families():
    """Families no whole preset uses: Qwen2-MoE (a gated shared expert), DeepSeek-V3 (sigmoid, grouped)."""
    q2 = tf.Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                           intermediate_size=96)
    v3 = tf.DeepseekV3Config(**(SMALL | {"num_key_value_heads": 4}), n_routed_experts=8, n_shared_experts=1,
                             moe_intermediate_size=32, intermediate_size=96, n_group=2, topk_group=1,
                             first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16, norm_topk_prob=True, routed_scaling_factor=2.5)
    return {"qwen2_moe": (q2, tf.Qwen2MoeForCausalLM, 3), "deepseek_v3": (v3, tf.DeepseekV3ForCausalLM, 2)}


def _model(name: str) -> tuple[torch.nn.Module, int]:
    """A 3-layer model of the family with weights past their init (std 0.2), so a wrongly shared tensor shows."""
    if name in PRESETS:
        model, moe = build_model(tiny(name, layers=3), seed=2), PRESETS[name]
    else:
        config, cls, moe = _other_families()[name]
        torch.manual_seed(2)
        model = cls(config).eval()
    with torch.no_grad():
        for n, p in [*model.named_parameters(), *model.named_buffers()]:
            if p.dim() >= 2 or "bias" in n:
                p.normal_(std=0.2)
    return model, moe


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))  # [B, L]


@pytest.mark.parametrize("name", [*PRESETS, "qwen2_moe", "deepseek_v3"])
def test_swapped_model_gives_transformers_logits(name):
    model, moe_layers = _model(name)
    ids = _ids()
    with torch.inference_mode():
        want = model(input_ids=ids).logits  # [B, L, V]
    params = sum(p.numel() for p in model.parameters())
    experts = {i: layer.mlp.experts.gate_up_proj for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "experts")}
    assert swap_moe_blocks(model, strategy="grouped") == moe_layers == len(experts)
    for i, w in experts.items():  # the same storage: shared, not copied
        moe = model.model.layers[i].mlp
        assert isinstance(moe, SwappedMoE) and moe.moe.experts.gate_up_proj.data_ptr() == w.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    for strategy in EXACT:
        for layer in model.model.layers:
            if isinstance(layer.mlp, SwappedMoE):
                layer.mlp.moe.strategy = strategy
        with torch.inference_mode():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda s, st=strategy: f"{st}: {s}")
    assert swap_moe_blocks(model) == 0  # nothing left to swap


def test_swap_in_bfloat16_keeps_the_dtypes():
    model = build_model(tiny("deepseek-v2-lite", layers=2), dtype=torch.bfloat16, seed=1)
    ids = _ids()
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    assert swap_moe_blocks(model, strategy="grouped") == 1
    moe = model.model.layers[1].mlp.moe
    assert moe.router.weight.dtype == torch.float32 and moe.experts.down_proj.dtype == torch.bfloat16
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_a_transformers_implementation_keeps_the_blocks():
    model = build_model(tiny("qwen3-30b-a3b"), seed=0)
    assert swap_moe_blocks(model, impl="eager") == 0
    assert model.config._experts_implementation == "eager"
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"


def test_a_dense_model_swaps_nothing():
    model = build_model(tiny("qwen3-8b"), seed=0)
    assert swap_moe_blocks(model) == 0
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MLP"


@pytest.mark.parametrize(("kwargs", "needle"), [(dict(impl="vllm"), "impl='vllm' is unknown; choose moe-energy"),
                                                (dict(strategy="fastest"), "strategy='fastest' is an unknown")])
def test_mistakes_are_one_line_config_errors(kwargs, needle):
    model = build_model(tiny("mixtral-8x7b"), seed=0)
    with pytest.raises(ConfigError) as e:
        swap_moe_blocks(model, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
