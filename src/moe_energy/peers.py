"""transformers' own MoE block for an arch, holding moe-energy's layer weights 1:1: the peer to beat.

``bench-strategies --arch`` times it beside moe-energy's strategies. The block is built from a config of the
arch's shape and the ``MoELayer``'s router, experts and shared experts are copied into it under the same
names (no transpose, no split: transformers 5 stores experts as ``MoELayer`` does), so both compute the same
function on the same weights. transformers dispatches the routed experts on ``config._experts_implementation``
(``eager`` plus every entry of ``integrations.moe.ALL_EXPERTS_FUNCTIONS``: ``batched_mm``, ``grouped_mm``,
and GPU kernels); one peer per implementation, all sharing one copy of the weights.

transformers is an optional dependency (the ``test`` extra): it is imported here, lazily, and its absence is
a one-line reason, never an ImportError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import described
from .models.archs import Arch
from .models.llm import MoELayer

# Implementations that load a hub kernel for a CUDA GPU: never tried elsewhere (no download on a CPU host).
GPU_ONLY = {"deepgemm": "needs a CUDA GPU and bfloat16 (DeepGEMM hub kernel)",
            "sonicmoe": "needs a CUDA GPU (sonic-moe hub kernel)"}


@dataclass(frozen=True)
class Family:
    """One transformers MoE block: where it lives, its config class, and which arch shapes it can hold."""

    name: str
    block: str  # class in transformers.models.<name>.modeling_<name>
    config: str  # config class exported by transformers
    router: str  # models.archs router kind it computes
    shared: str  # "none" | "gated" (Qwen2-MoE: one shared expert, sigmoid gate) | "plain" (DeepSeek)
    kwargs: Callable[[Arch], dict[str, Any]]
    always_normalizes: bool = False  # Mixtral renormalises the top-k weights whatever the config says
    shared_key: str = ""  # the shared expert's module name in the block


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
)}
# A preset's own family first (its name's start); a custom shape takes the first family that fits it.
BY_PREFIX = (("mixtral", "mixtral"), ("qwen1.5", "qwen2_moe"), ("qwen3", "qwen3_moe"), ("olmoe", "olmoe"),
             ("deepseek-v2", "deepseek_v2"), ("deepseek-v3", "deepseek_v3"))


def misfit(f: Family, a: Arch) -> str | None:
    """Why ``f``'s block cannot compute ``a``'s layer (None: it can)."""
    if a.act != "silu" or a.expert_bias:
        return "experts with biases or gpt-oss's clamped activation"
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
                  f"{a.shared_experts} shared); gpt-oss and DBRX blocks are not mapped 1:1 in this version")


@dataclass
class Peer:
    """transformers' block under one experts implementation; ``block`` None and ``reason`` set when unavailable."""

    implementation: str
    block: nn.Module | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        return f"transformers[{self.implementation}]"

    def __call__(self, x: Tensor) -> Tensor:
        """x [T, d] -> [T, d], as ``MoELayer`` (the block wants [batch, seq, d])."""
        assert self.block is not None, self.reason
        return self.block(x.unsqueeze(0)).squeeze(0)


@dataclass
class Peers:
    """Every peer of one layer, or (``reason``) why there are none at all."""

    family: str | None = None
    version: str | None = None
    peers: list[Peer] = field(default_factory=list)
    reason: str | None = None

    @property
    def available(self) -> list[Peer]:
        return [p for p in self.peers if p.block is not None]

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "transformers_version": self.version, "unavailable": self.reason,
                "implementations": {p.implementation: p.reason for p in self.peers}}


def transformers_or_reason() -> tuple[Any, str | None]:
    """The transformers module, or None and a one-line reason (it is in the ``test`` extra only)."""
    try:
        return importlib.import_module("transformers"), None
    except ImportError as e:
        return None, (f"transformers is not installed ({described(e, 80)}); pip install 'moe-energy[test]' "
                      "(or transformers>=5) to time its MoE blocks")


def implementations() -> list[str]:
    """What this transformers offers for ``_experts_implementation``: eager, then its registered functions."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def layer_state(layer: MoELayer, f: Family) -> dict[str, Tensor]:
    """The layer's weights under the block's names, cloned once (every peer shares this one copy)."""
    sd = {f"gate.{k}": v for k, v in layer.router.state_dict().items()}
    sd.update({f"experts.{k}": v for k, v in layer.experts.state_dict().items()})
    if layer.shared is not None:
        s = layer.shared
        sd.update({f"{f.shared_key}.{n}.weight": getattr(s, n).weight for n in ("gate_proj", "up_proj", "down_proj")})
        if s.gate is not None:
            sd["shared_expert_gate.weight"] = s.gate.weight
    return {k: v.detach().clone() for k, v in sd.items()}


def build_block(tf: Any, f: Family, arch: Arch, implementation: str, state: dict[str, Tensor]) -> nn.Module:
    """``f``'s block for ``arch`` made on the meta device (no random init) and given ``state``'s tensors."""
    config = getattr(tf, f.config)(**f.kwargs(arch))
    config._experts_implementation = implementation
    module = importlib.import_module(f"transformers.models.{f.name}.modeling_{f.name}")
    with torch.device("meta"):
        block = getattr(module, f.block)(config)
    block.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{f.block}: {', '.join(left)} not copied from the layer")
    return block.eval()


def _why_not(implementation: str, block: nn.Module, layer: MoELayer) -> str | None:
    """None when this implementation runs here (one token through it), else the one-line reason."""
    p = layer.experts.gate_up_proj
    if implementation in GPU_ONLY and (p.device.type != "cuda" or
                                       (implementation == "deepgemm" and p.dtype != torch.bfloat16)):
        return GPU_ONLY[implementation]
    try:
        with torch.inference_mode():
            Peer(implementation, block)(torch.zeros(1, layer.hidden, device=p.device, dtype=p.dtype))
    except Exception as e:  # a kernel missing for this device or dtype: that implementation is not offered here
        return described(e, 160)
    return None


def build_peers(layer: MoELayer, only: list[str] | None = None) -> Peers:
    """transformers' block for ``layer`` once per experts implementation (``only``: those names), each tried
    on one token; whatever cannot run here is a peer with a reason, not an error."""
    tf, why = transformers_or_reason()
    if tf is None:
        return Peers(reason=why)
    if layer.arch is None:
        return Peers(version=tf.__version__, reason="the layer was not built from an Arch (MoELayer.from_arch)")
    f, why = family_for(layer.arch)
    if f is None:
        return Peers(version=tf.__version__, reason=why)
    state = layer_state(layer, f)
    out = Peers(family=f.name, version=tf.__version__)
    for impl in only or implementations():
        block = build_block(tf, f, layer.arch, impl, state)
        reason = _why_not(impl, block, layer)
        out.peers.append(Peer(impl, None if reason else block, reason))
    return out
