"""moe-energy's MoE layer inside a transformers model: every MoE block of a built ``*ForCausalLM`` replaced by a
``MoELayer`` holding the block's own tensors (shared, not copied), so the whole model computes the same logits
while its experts run under moe-energy's strategies.

The layout mapping is models/families.py's (``FAMILIES``: where the router, experts and shared experts live in each
block) read in the other direction: peers copies a layer into a block, this shares a block's tensors with a
layer. gpt-oss stores its experts transposed ([E, d, 2I]); the layer takes the transposed view ("in_out"
layout), which its strategies run as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .archs import Arch, RouterSpec
from .families import FAMILIES, Family, implementations, misfit
from .llm import MoELayer
from .routers import build_router

# transformers model_type -> the families.py family of its MoE block (DBRX's split w1/v1/w2 is not mapped here)
SWAPPABLE = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")


class SwappedMoE(nn.Module):
    """Sits where transformers' block sat: hidden [B, S, d] -> [B, S, d] through ``moe`` (a MoELayer on the
    block's tensors). gpt-oss's decoder layer unpacks (out, router_scores): ``returns_pair`` gives it (out, None)."""

    def __init__(self, moe: MoELayer, returns_pair: bool = False) -> None:
        super().__init__()
        self.moe, self.returns_pair = moe, returns_pair

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, None]:
        y = self.moe(hidden_states.reshape(-1, hidden_states.shape[-1])).view(hidden_states.shape)  # [B, S, d]
        return (y, None) if self.returns_pair else y


def arch_of(config: Any, family: str) -> Arch:
    """The MoE layer ``config`` describes, as an Arch (the inverse of families.py's ``Family.kwargs``)."""
    c, d, k = config, config.hidden_size, config.num_experts_per_tok
    if family in ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral"):
        width = c.intermediate_size if family in ("olmoe", "mixtral") else c.moe_intermediate_size
        experts = c.num_local_experts if family == "mixtral" else c.num_experts
        normalize = True if family == "mixtral" else bool(c.norm_topk_prob)
        shared = getattr(c, "shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
        return Arch(f"{family}-block", d, width, experts, k, shared_experts=1 if shared else 0, shared_width=shared,
                    shared_gate=bool(shared), router=RouterSpec("softmax_topk", normalize=normalize))
    if family == "deepseek_v2":
        grouped = c.topk_method == "group_limited_greedy"
        spec = RouterSpec("deepseek_v2", scaling=float(c.routed_scaling_factor),
                          n_group=c.n_group if grouped else 1, topk_group=c.topk_group if grouped else 1)
        return Arch(f"{family}-block", d, c.moe_intermediate_size, c.n_routed_experts, k,
                    shared_experts=c.n_shared_experts, shared_width=c.moe_intermediate_size, router=spec)
    if family == "deepseek_v3":
        spec = RouterSpec("sigmoid_group", normalize=bool(c.norm_topk_prob), scaling=float(c.routed_scaling_factor),
                          n_group=c.n_group, topk_group=c.topk_group)
        return Arch(f"{family}-block", d, c.moe_intermediate_size, c.n_routed_experts, k,
                    shared_experts=c.n_shared_experts, shared_width=c.moe_intermediate_size, router=spec)
    return Arch(f"{family}-block", d, c.intermediate_size, c.num_local_experts, k, router=RouterSpec("topk_softmax"),
                expert_bias=True, act="gpt_oss")


def layer_state(block: nn.Module, f: Family) -> dict[str, Tensor]:
    """The block's tensors under MoELayer's names, detached but sharing storage: peers.layer_state reversed."""
    sd = {k: v.detach() for k, v in block.state_dict(keep_vars=True).items()}
    out = {f"router.{k[len(f.router_key) + 1:]}": v for k, v in sd.items() if k.startswith(f.router_key + ".")}
    for name in ("gate_up_proj", "down_proj"):
        w = sd[f"experts.{name}"]
        out[f"experts.{name}"] = w.transpose(1, 2) if f.name == "gpt_oss" else w  # gpt-oss: [E, in, out] storage
        if f"experts.{name}_bias" in sd:
            out[f"experts.{name}_bias"] = sd[f"experts.{name}_bias"]
    if f.shared_key:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared.{n}.weight"] = sd[f"{f.shared_key}.{n}.weight"]
    if "shared_expert_gate.weight" in sd:
        out["shared.gate.weight"] = sd["shared_expert_gate.weight"]
    return out


def layer_for(block: nn.Module, config: Any, f: Family, strategy: str = "auto") -> MoELayer:
    """A MoELayer made on the meta device (no weights of its own) and given the block's tensors."""
    a = arch_of(config, f.name)
    why = misfit(f, a)
    if why is not None:  # a config this mapping misreads: never swap in a layer computing something else
        raise ConfigError(f"swap_moe_blocks: {f.block} of this config has {why}, which MoELayer cannot hold 1:1")
    ex = block.experts
    with torch.device("meta"):
        layer = MoELayer(a.d_model, a.ffn_dim, a.experts, build_router(a),
                         shared_intermediate=a.shared_experts * a.shared_width, shared_gate=a.shared_gate,
                         expert_bias=a.expert_bias, act=a.act, interleaved=a.act == "gpt_oss",
                         limit=getattr(ex, "limit", 7.0), alpha=getattr(ex, "alpha", 1.702), strategy=strategy)
    layer.load_state_dict(layer_state(block, f), strict=True, assign=True)
    device = ex.gate_up_proj.device
    layer.pair_counts = torch.zeros(2, dtype=torch.long, device=device)  # the one buffer not in the state dict
    layer.arch = a
    return layer.eval()


def is_moe(config: Any) -> bool:
    """Whether a transformers config has routed experts (a dense model has none of these keys, or 0)."""
    return any(getattr(config, k, 0) or 0 for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def swap_moe_blocks(model: nn.Module, impl: str = "moe-energy", strategy: str = "auto") -> int:
    """Replace every transformers MoE block of ``model`` by a MoELayer on the same tensors; the count swapped
    (0 for a dense model, so one call serves both sides of a comparison).

    ``impl="moe-energy"`` swaps (the experts then run under ``strategy``: any of models.strategies, or auto).
    A transformers experts implementation (``eager``, ``batched_mm``, ``grouped_mm``, ...) keeps the blocks and
    selects it instead, swapping none.
    """
    config = model.config
    family = config.model_type
    if impl != "moe-energy" and impl not in implementations():
        raise ConfigError(f"impl={impl!r} is unknown; choose moe-energy or one of transformers' "
                          f"{', '.join(implementations())}")
    if not is_moe(config):
        return 0
    if impl != "moe-energy":
        model.set_experts_implementation(impl)
        return 0
    if family not in SWAPPABLE:
        raise ConfigError(f"swap_moe_blocks: {type(model).__name__} ({family}) has no MoE block mapped here; "
                          f"swappable: {', '.join(SWAPPABLE)}")
    f = FAMILIES[family]
    swapped = 0
    for layer in model.model.layers:
        block = getattr(layer, "mlp", None)
        if type(block).__name__ == f.block:
            layer.mlp = SwappedMoE(layer_for(block, config, f, strategy), returns_pair=family == "gpt_oss")
            swapped += 1
    return swapped
