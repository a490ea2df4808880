"""Where each transformers MoE block keeps what moe-energy's ``MoELayer`` holds: its config keys for an arch, the
router's, experts' and shared experts' names and storage (most transformers 5 experts store weights as ``MoELayer``
does; gpt-oss's are transposed, DBRX's split into w1/v1/w2), which arch shapes it can compute, and which experts
implementations transformers offers. Plain data and copies: ``bench.peers`` builds the blocks from it (the peer
to beat), ``models.swap`` reads it backwards (moe-energy's layer inside a transformers model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .archs import Arch
from .llm import MoELayer, StackedSwiGLU


def _copy(t: Tensor) -> Tensor:
    """A contiguous copy in one allocation: a transposed view lands in the block's own storage order, so the
    block runs on the memory layout its users load, not on a strided view of the layer's."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _experts_as_is(ex: StackedSwiGLU) -> dict[str, Tensor]:
    """transformers 5's usual ``*Experts``: ``MoELayer``'s names and shapes, copied."""
    return {k: _copy(v) for k, v in ex.state_dict().items()}


def _gpt_oss_experts(ex: StackedSwiGLU) -> dict[str, Tensor]:
    """GptOssExperts computes x @ W: gate_up [E, d, 2I] (gate/up interleaved, as the layer's rows), down [E, I, d]."""
    return {"gate_up_proj": _copy(ex.gate_up_proj.transpose(1, 2)), "gate_up_proj_bias": _copy(ex.gate_up_proj_bias),
            "down_proj": _copy(ex.down_proj.transpose(1, 2)), "down_proj_bias": _copy(ex.down_proj_bias)}


def _dbrx_experts(ex: StackedSwiGLU) -> dict[str, Tensor]:
    """DbrxExpertGLU: w1 (gate) and v1 (up) [E*I, d] as nn.Linear rows, w2 [E*I, d] applied as x_I @ w2[e]."""
    e, two_i, d = ex.gate_up_proj.shape
    n = two_i // 2  # the layer's gate_up rows are [gate; up] for silu experts
    return {"mlp.w1": _copy(ex.gate_up_proj[:, :n]).view(e * n, d),
            "mlp.v1": _copy(ex.gate_up_proj[:, n:]).view(e * n, d),
            "mlp.w2": _copy(ex.down_proj.transpose(1, 2)).view(e * n, d)}


@dataclass(frozen=True)
class Family:
    """One transformers MoE block: where it lives, its config class, which arch shapes it can hold, and where
    the layer's weights go in it."""

    name: str
    block: str  # class in transformers.models.<name>.modeling_<name>
    config: str  # config class exported by transformers
    router: str  # models.archs router kind it computes
    shared: str  # "none" | "gated" (Qwen2-MoE: one shared expert, sigmoid gate) | "plain" (DeepSeek)
    kwargs: Callable[[Arch], dict[str, Any]]
    always_normalizes: bool = False  # Mixtral renormalises the top-k weights whatever the config says
    shared_key: str = ""  # the shared expert's module name in the block
    router_key: str = "gate"  # the router's module name in the block
    act: str = "silu"  # the routed experts' activation (models.archs.EXPERT_ACTS) ...
    expert_bias: bool = False  # ... and whether they have biases (gpt-oss)
    experts: Callable[[StackedSwiGLU], dict[str, Tensor]] = _experts_as_is  # copies under the block's names


def _softmax_kwargs(intermediate: str, experts: str) -> Callable[[Arch], dict[str, Any]]:
    def kw(a: Arch) -> dict[str, Any]:
        return {"hidden_size": a.d_model, intermediate: a.ffn_dim, experts: a.experts,
                "num_experts_per_tok": a.top_k, "norm_topk_prob": a.router.normalize}
    return kw


def _qwen2_kwargs(a: Arch) -> dict[str, Any]:
    return {**_softmax_kwargs("moe_intermediate_size", "num_experts")(a),
            "shared_expert_intermediate_size": a.shared_experts * a.shared_width}


def _deepseek_kwargs(a: Arch) -> dict[str, Any]:
    r = a.router
    kw = {"hidden_size": a.d_model, "moe_intermediate_size": a.ffn_dim, "n_routed_experts": a.experts,
          "n_shared_experts": a.shared_experts, "num_experts_per_tok": a.top_k, "routed_scaling_factor": r.scaling,
          "n_group": r.n_group, "topk_group": r.topk_group}
    if r.kind == "deepseek_v2":
        return {**kw, "topk_method": "greedy" if r.n_group == 1 else "group_limited_greedy"}
    return {**kw, "norm_topk_prob": r.normalize}


def _gpt_oss_kwargs(a: Arch) -> dict[str, Any]:
    """swiglu_alpha 1.702 and swiglu_limit 7 are left at GptOssConfig's defaults: MoELayer.from_arch's too."""
    return {"hidden_size": a.d_model, "intermediate_size": a.ffn_dim, "num_local_experts": a.experts,
            "num_experts_per_tok": a.top_k}


def _dbrx_kwargs(a: Arch) -> dict[str, Any]:
    """DBRX's FFN reads ``ffn_config``; its L1 renormalisation is ``moe_normalize_expert_weights`` = 1 (None: off)."""
    return {"d_model": a.d_model, "ffn_config": {
        "ffn_hidden_size": a.ffn_dim, "moe_num_experts": a.experts, "moe_top_k": a.top_k,
        "moe_normalize_expert_weights": 1.0 if a.router.normalize else None}}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mixtral", "MixtralSparseMoeBlock", "MixtralConfig", "softmax_topk", "none",
           _softmax_kwargs("intermediate_size", "num_local_experts"), always_normalizes=True),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig", "softmax_topk", "none",
           _softmax_kwargs("moe_intermediate_size", "num_experts")),
    Family("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig", "softmax_topk", "none",
           _softmax_kwargs("intermediate_size", "num_experts")),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig", "softmax_topk", "gated", _qwen2_kwargs,
           shared_key="shared_expert"),
    Family("deepseek_v2", "DeepseekV2Moe", "DeepseekV2Config", "deepseek_v2", "plain", _deepseek_kwargs,
           shared_key="shared_experts"),
    Family("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config", "sigmoid_group", "plain", _deepseek_kwargs,
           shared_key="shared_experts"),
    Family("gpt_oss", "GptOssMLP", "GptOssConfig", "topk_softmax", "none", _gpt_oss_kwargs, router_key="router",
           act="gpt_oss", expert_bias=True, experts=_gpt_oss_experts),
    Family("dbrx", "DbrxFFN", "DbrxConfig", "dbrx", "none", _dbrx_kwargs, router_key="router",
           experts=_dbrx_experts),
)}
# A preset's own family first (its name's start); a custom shape takes the first family that fits it.
BY_PREFIX = (("mixtral", "mixtral"), ("qwen1.5", "qwen2_moe"), ("qwen3", "qwen3_moe"), ("olmoe", "olmoe"),
             ("deepseek-v2", "deepseek_v2"), ("deepseek-v3", "deepseek_v3"), ("gpt-oss", "gpt_oss"),
             ("dbrx", "dbrx"))


def misfit(f: Family, a: Arch) -> str | None:
    """Why ``f``'s block cannot compute ``a``'s layer (None: it can)."""
    if (a.act, a.expert_bias) != (f.act, f.expert_bias):
        return f"experts with {a.act}{' and biases' if a.expert_bias else ''}"
    if a.router.kind != f.router or (f.always_normalizes and not a.router.normalize):
        return f"router {a.router.describe()!r}"
    shared = "none" if not a.shared_experts else ("gated" if a.shared_gate else "plain")
    if shared != f.shared or (f.name == "qwen2_moe" and a.shared_experts != 1):
        return f"{a.shared_experts} shared expert(s){' (gated)' if a.shared_gate else ''}"
    if f.shared == "plain" and a.shared_width != a.ffn_dim:
        return f"shared width {a.shared_width} != the routed width {a.ffn_dim}"
    return None


def family_for(a: Arch) -> tuple[Family | None, str]:
    """The transformers block for ``a`` (its preset's own first), or None and why none fits."""
    own = [fam for prefix, fam in BY_PREFIX if a.name.startswith(prefix)]
    for name in [*own, *FAMILIES]:
        if misfit(FAMILIES[name], a) is None:
            return FAMILIES[name], ""
    return None, (f"no transformers MoE block mapped here computes {a.name!r} (routed experts with "
                  f"{a.act}{', biases' if a.expert_bias else ''}, router {a.router.describe()}, "
                  f"{a.shared_experts} shared{' gated' if a.shared_gate else ''})")


def implementations() -> list[str]:
    """What this transformers offers for ``_experts_implementation``: eager, then its registered functions."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def layer_state(layer: MoELayer, f: Family) -> dict[str, Tensor]:
    """The layer's weights under the block's names and in its storage, copied once (every peer shares this copy)."""
    sd = {f"{f.router_key}.{k}": _copy(v) for k, v in layer.router.state_dict().items()}
    sd.update({f"experts.{k}": v for k, v in f.experts(layer.experts).items()})
    if layer.shared is not None:
        s = layer.shared
        sd.update({f"{f.shared_key}.{n}.weight": _copy(getattr(s, n).weight)
                   for n in ("gate_proj", "up_proj", "down_proj")})
        if s.gate is not None:
            sd["shared_expert_gate.weight"] = _copy(s.gate.weight)
    return sd
