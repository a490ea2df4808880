"""Shapes of published LLM MoE layers, and custom ones, as plain data (no tensors).

An ``Arch`` is one MoE feed-forward layer (router, E SwiGLU experts of width I, optional shared experts) and
how many of them a model stacks. Each preset's values are the checkpoint's own ``config.json`` (named in
``source``), read with transformers 5.24.0's configuration class; where a class default differs from the
checkpoint the checkpoint wins (noted in ``source``). Router semantics follow transformers 5.24.0's router
code; ``routers.py`` builds the modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, check_choice
from .counting import layer_params

# softmax_topk: softmax (fp32) -> top-k [-> renormalise]          Mixtral, Qwen2/3-MoE, OLMoE
# dbrx:         softmax (logits dtype) -> top-k -> L1-normalise   DBRX (weight held as router.layer.weight)
# deepseek_v2:  softmax (fp32) -> [group-limited] top-k -> x scaling   DeepSeek-V2(-Lite)
# sigmoid_group: sigmoid + selection bias -> group-limited top-k -> renormalise -> x scaling   DeepSeek-V3
# topk_softmax: Linear with bias -> top-k logits -> softmax over the k   gpt-oss
ROUTER_KINDS = ("softmax_topk", "dbrx", "deepseek_v2", "sigmoid_group", "topk_softmax")
# Largest per-layer parameter count a custom shape may have: far past any published layer (DeepSeek-V3: 1.1e10).
MAX_LAYER_PARAMS = 10**12
# The experts' activation: SwiGLU with silu, or gpt-oss's clamped one (alpha 1.702, limit 7, up + 1).
EXPERT_ACTS = ("silu", "gpt_oss")


# Largest batch we accept (--batch-size, a whole model's --batch): a typo like 1e11 is not a batch.
MAX_BATCH = 10**7


def whole(where: str, name: str, v: Any, least: int = 1) -> int:
    """``v`` as an int >= ``least``, or a one-line ConfigError (a bool or 1.5 is a slip, not a size)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ConfigError(f"{where}: {name}={v!r} must be a whole number >= {least}")
    return v


@dataclass(frozen=True)
class RouterSpec:
    """Which router and its parameters (transformers' config names in comments)."""

    kind: str = "softmax_topk"
    normalize: bool = False  # norm_topk_prob / moe_normalize_expert_weights=1: the k weights sum to 1
    scaling: float = 1.0  # routed_scaling_factor: multiplies the k weights after any renormalisation
    n_group: int = 1  # n_group: experts split into this many groups ...
    topk_group: int = 1  # topk_group: ... and each token picks its experts from its best topk_group groups

    def check(self, experts: int, top_k: int, where: str = "router") -> RouterSpec:
        """One-line ConfigError for a kind, scaling or grouping the router cannot run with."""
        if self.kind not in ROUTER_KINDS:
            raise ConfigError(f"{where}: router={self.kind!r} is unknown; choose from {', '.join(ROUTER_KINDS)}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"{where}: normalize={self.normalize!r} must be True or False")
        s = self.scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ConfigError(f"{where}: scaling={s!r} must be a finite number > 0")
        if self.normalize and self.kind in ("deepseek_v2", "topk_softmax"):
            raise ConfigError(f"{where}: normalize=True has no meaning for router {self.kind!r} (transformers' "
                              "never renormalises it); drop it")
        if s != 1.0 and self.kind not in ("deepseek_v2", "sigmoid_group"):
            raise ConfigError(f"{where}: scaling={s!r} needs a DeepSeek router (deepseek_v2 or sigmoid_group)")
        g = whole(where, "n_group", self.n_group)
        tg = whole(where, "topk_group", self.topk_group)
        if g > 1 and self.kind not in ("deepseek_v2", "sigmoid_group"):
            raise ConfigError(f"{where}: n_group={g} needs a group-limited router (deepseek_v2 or sigmoid_group)")
        if experts % g:
            raise ConfigError(f"{where}: n_group={g} does not divide experts={experts}; choose a divisor")
        if tg > g:
            raise ConfigError(f"{where}: topk_group={tg} exceeds n_group={g}; choose 1 to {g}")
        if top_k > tg * (experts // g):
            raise ConfigError(f"{where}: top_k={top_k} exceeds the {tg * (experts // g)} experts in the "
                              f"topk_group={tg} best groups; raise topk_group or lower top_k")
        return self

    def describe(self) -> str:
        """Short human form for tables: 'softmax top-k, renorm', 'sigmoid+bias top-k, 8 groups top-4, renorm, x2.5'."""
        head = {"softmax_topk": "softmax top-k", "dbrx": "softmax top-k (dbrx)", "deepseek_v2": "softmax top-k",
                "sigmoid_group": "sigmoid+bias top-k", "topk_softmax": "top-k logits, softmax"}[self.kind]
        parts = [head]
        if self.n_group > 1:
            parts.append(f"{self.n_group} groups top-{self.topk_group}")
        if self.kind != "topk_softmax":
            parts.append("renorm" if self.normalize else "no renorm")
        if self.scaling != 1.0:
            parts.append(f"x{self.scaling:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Arch:
    """One MoE FFN layer's shape and how many a model has; checked when built (one-line ConfigError)."""

    name: str
    d_model: int
    ffn_dim: int  # I: each routed expert's SwiGLU width
    experts: int
    top_k: int
    shared_experts: int = 0
    shared_width: int = 0  # each shared expert's SwiGLU width (0 when there are none)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(d, 1)) scales the shared output
    router: RouterSpec = field(default_factory=RouterSpec)
    moe_layers: int = 1
    dense_layers: int = 0  # DeepSeek: the first layers keep a dense SwiGLU FFN ...
    dense_ffn_dim: int = 0  # ... of this width
    expert_bias: bool = False  # gpt-oss: gate_up_proj_bias [E, 2I] and down_proj_bias [E, d]
    act: str = "silu"  # one of EXPERT_ACTS
    source: str = "custom"

    def __post_init__(self) -> None:
        check_arch(self)

    @property
    def router_bias(self) -> bool:
        """gpt-oss's router is a Linear with a bias; the others have none."""
        return self.router.kind == "topk_softmax"


def check_arch(a: Arch) -> Arch:
    """Every field in range, so the arithmetic and the modules built from ``a`` can trust it."""
    where = f"arch {a.name!r}"
    if not isinstance(a.name, str) or not a.name:
        raise ConfigError(f"arch name={a.name!r} must be a non-empty string")
    for f in ("d_model", "ffn_dim", "experts", "top_k", "moe_layers"):
        whole(where, f, getattr(a, f))
    for f in ("shared_experts", "dense_layers"):
        whole(where, f, getattr(a, f), least=0)
    if a.top_k > a.experts:
        raise ConfigError(f"{where}: top_k={a.top_k} exceeds experts={a.experts}; choose 1 to {a.experts}")
    whole(where, "shared_width", a.shared_width, least=1 if a.shared_experts else 0)
    whole(where, "dense_ffn_dim", a.dense_ffn_dim, least=1 if a.dense_layers else 0)
    for f in ("shared_gate", "expert_bias"):
        if not isinstance(getattr(a, f), bool):
            raise ConfigError(f"{where}: {f}={getattr(a, f)!r} must be True or False")
    if a.act not in EXPERT_ACTS:
        raise ConfigError(f"{where}: act={a.act!r} is unknown; choose from {', '.join(EXPERT_ACTS)}")
    if a.shared_gate and not a.shared_experts:
        raise ConfigError(f"{where}: shared_gate=True needs shared_experts >= 1")
    if not isinstance(a.router, RouterSpec):
        raise ConfigError(f"{where}: router={a.router!r} must be a RouterSpec")
    a.router.check(a.experts, a.top_k, where)
    if layer_params(a) > MAX_LAYER_PARAMS:
        raise ConfigError(f"{where}: {layer_params(a):.3g} parameters per layer exceed the {MAX_LAYER_PARAMS:.0e} "
                          "this tool accepts; choose a smaller shape")
    return a


def custom_arch(d_model: int, ffn_dim: int, experts: int, top_k: int, shared_experts: int = 0,
                router: str | RouterSpec = "softmax_topk", *, shared_width: int | None = None,
                shared_gate: bool = False, moe_layers: int = 1, name: str = "custom") -> Arch:
    """An ``Arch`` of any shape: shared experts default to the routed width (DeepSeek's convention)."""
    spec = RouterSpec(kind=router) if isinstance(router, str) else router
    width = (ffn_dim if shared_experts else 0) if shared_width is None else shared_width
    return Arch(name=name, d_model=d_model, ffn_dim=ffn_dim, experts=experts, top_k=top_k,
                shared_experts=shared_experts, shared_width=width, shared_gate=shared_gate, router=spec,
                moe_layers=moe_layers)


_RENORM = RouterSpec("softmax_topk", normalize=True)
_PLAIN = RouterSpec("softmax_topk", normalize=False)
_OSS = RouterSpec("topk_softmax")
_HF = "huggingface.co/"

PRESETS: dict[str, Arch] = {a.name: a for a in (
    Arch("mixtral-8x7b", 4096, 14336, 8, 2, router=_RENORM, moe_layers=32,
         source=_HF + "mistralai/Mixtral-8x7B-v0.1 config.json (= MixtralConfig defaults)"),
    Arch("mixtral-8x22b", 6144, 16384, 8, 2, router=_RENORM, moe_layers=56,
         source=_HF + "mistralai/Mixtral-8x22B-v0.1 config.json"),
    Arch("dbrx", 6144, 10752, 16, 4, router=RouterSpec("dbrx", normalize=True), moe_layers=40,
         source=_HF + "databricks/dbrx-base config.json (ffn_config; moe_normalize_expert_weights=1)"),
    Arch("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, shared_experts=1, shared_width=5632, shared_gate=True,
         router=_PLAIN, moe_layers=24,
         source=_HF + "Qwen/Qwen1.5-MoE-A2.7B config.json (= Qwen2MoeConfig defaults; norm_topk_prob false)"),
    Arch("qwen3-30b-a3b", 2048, 768, 128, 8, router=_RENORM, moe_layers=48,
         source=_HF + "Qwen/Qwen3-30B-A3B config.json (norm_topk_prob true; class default false)"),
    Arch("qwen3-235b-a22b", 4096, 1536, 128, 8, router=_RENORM, moe_layers=94,
         source=_HF + "Qwen/Qwen3-235B-A22B config.json (norm_topk_prob true; class default false)"),
    Arch("olmoe-1b-7b", 2048, 1024, 64, 8, router=_PLAIN, moe_layers=16,
         source=_HF + "allenai/OLMoE-1B-7B-0924 config.json (intermediate_size 1024; class default 2048)"),
    Arch("deepseek-v2-lite", 2048, 1408, 64, 6, shared_experts=2, shared_width=1408,
         router=RouterSpec("deepseek_v2", scaling=1.0), moe_layers=26, dense_layers=1, dense_ffn_dim=10944,
         source=_HF + "deepseek-ai/DeepSeek-V2-Lite config.json (27 layers, first_k_dense_replace 1; "
                      "moe_intermediate_size 1408, class default 1407; topk_method greedy)"),
    Arch("deepseek-v2", 5120, 1536, 160, 6, shared_experts=2, shared_width=1536,
         router=RouterSpec("deepseek_v2", scaling=16.0, n_group=8, topk_group=3), moe_layers=59,
         dense_layers=1, dense_ffn_dim=12288,
         source=_HF + "deepseek-ai/DeepSeek-V2 config.json (60 layers, first_k_dense_replace 1; "
                      "topk_method group_limited_greedy)"),
    Arch("deepseek-v3", 7168, 2048, 256, 8, shared_experts=1, shared_width=2048,
         router=RouterSpec("sigmoid_group", normalize=True, scaling=2.5, n_group=8, topk_group=4),
         moe_layers=58, dense_layers=3, dense_ffn_dim=18432,
         source=_HF + "deepseek-ai/DeepSeek-V3 config.json (= DeepseekV3Config defaults: 61 layers, "
                      "first_k_dense_replace 3; the MTP layer not counted)"),
    Arch("gpt-oss-20b", 2880, 2880, 32, 4, router=_OSS, moe_layers=24, expert_bias=True, act="gpt_oss",
         source=_HF + "openai/gpt-oss-20b config.json"),
    Arch("gpt-oss-120b", 2880, 2880, 128, 4, router=_OSS, moe_layers=36, expert_bias=True, act="gpt_oss",
         source=_HF + "openai/gpt-oss-120b config.json (= GptOssConfig defaults)"),
)}


def get_arch(name: str) -> Arch:
    """A preset by name, or a one-line ConfigError naming the choices."""
    check_choice("arch", name, PRESETS)
    return PRESETS[name]
