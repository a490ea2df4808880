"""The routers of published LLM MoE layers: x [T, d] -> (expert_idx [T, k] int64, weights [T, k] in x.dtype).

Each class holds its weights under transformers' names and shapes (5.24.0), so a checkpoint's router state
dict loads 1:1, and computes what transformers' router computes, in the same precision (fp32 softmax where
transformers takes it in fp32; DeepSeek's router weight and selection bias kept in fp32 even when the layer
is cast, as transformers' ``_keep_in_fp32_modules_strict`` keeps them). The k indices come in no promised
order (DeepSeek's top-k is unsorted); ``weights[t, j]`` belongs to ``expert_idx[t, j]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .archs import Arch, RouterSpec, whole

Routing = tuple[torch.Tensor, torch.Tensor]


def _init_weight(weight: torch.Tensor) -> None:
    """nn.Linear's default init: logits of spread ~0.6 whatever d, so random-weight routing is neither
    uniform (std 0.02 at small d) nor one-hot."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class _Router(nn.Module):
    """Shape checks and the [T, d] view shared by every router."""

    def __init__(self, d_model: int, experts: int, top_k: int, spec: RouterSpec) -> None:
        super().__init__()
        where = type(self).__name__
        self.d_model, self.num_experts = whole(where, "d_model", d_model), whole(where, "experts", experts)
        self.top_k = whole(where, "top_k", top_k)
        if top_k > experts:
            raise ConfigError(f"{where}: top_k={top_k} exceeds experts={experts}; choose 1 to {experts}")
        self.spec = spec.check(experts, top_k, where)  # before any weight is allocated

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, experts={self.num_experts}, top_k={self.top_k}, {self.spec.describe()}"


class SoftmaxTopKRouter(_Router):
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over E in fp32, top-k, renormalised when ``normalize``
    (Mixtral always; Qwen/OLMoE per ``norm_topk_prob``, whose class default is False)."""

    def __init__(self, d_model: int, experts: int, top_k: int, normalize: bool = False) -> None:
        super().__init__(d_model, experts, top_k, RouterSpec("softmax_topk", normalize=normalize))
        self.weight = nn.Parameter(torch.empty(experts, d_model))
        _init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.reshape(-1, self.d_model), self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.spec.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return idx, top.to(x.dtype)


class DbrxRouter(_Router):
    """DBRX: softmax over E in the logits' dtype (not fp32), top-k, divided by their L1 norm when ``normalize``
    (``moe_normalize_expert_weights=1``); the weight lives in ``layer`` (a bias-free Linear), as in DBRX."""

    def __init__(self, d_model: int, experts: int, top_k: int, normalize: bool = True) -> None:
        super().__init__(d_model, experts, top_k, RouterSpec("dbrx", normalize=normalize))
        self.layer = nn.Linear(d_model, experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.layer(x.reshape(-1, self.d_model))
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.spec.normalize:
            top = top / torch.norm(top, p=1, dim=-1, keepdim=True)
        return idx, top.to(x.dtype)


class _Fp32Router(_Router):
    """DeepSeek's routers: the weight (and V3's selection bias) stay fp32 through ``.to(dtype)``/``.half()``,
    and the logits are taken in fp32, as transformers keeps and computes them."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        keep = {id(t) for t in (*self._parameters.values(), *self._buffers.values()) if t is not None}

        def cast(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(cast, recurse)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.reshape(-1, self.d_model).float(), self.weight.float())

    def _top_groups(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[T, G] group scores -> bool [T, E]: the experts in each token's ``topk_group`` best groups."""
        t, g = group_scores.shape
        best = torch.topk(group_scores, self.spec.topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return mask.unsqueeze(-1).expand(t, g, self.num_experts // g).reshape(t, self.num_experts)


class DeepseekV2Router(_Fp32Router):
    """DeepSeek-V2(-Lite): softmax over E in fp32, top-k (limited to the ``topk_group`` groups with the highest
    single score when ``n_group`` > 1: ``group_limited_greedy``), times ``scaling``; never renormalised."""

    def __init__(self, d_model: int, experts: int, top_k: int, scaling: float = 1.0, n_group: int = 1,
                 topk_group: int = 1) -> None:
        spec = RouterSpec("deepseek_v2", scaling=scaling, n_group=n_group, topk_group=topk_group)
        super().__init__(d_model, experts, top_k, spec)
        self.weight = nn.Parameter(torch.empty(experts, d_model, dtype=torch.float32))
        _init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        scores = self._logits(x).softmax(dim=-1, dtype=torch.float32)
        g = self.spec.n_group
        if g > 1:
            group_scores = scores.view(-1, g, self.num_experts // g).amax(dim=-1)
            scores = scores.masked_fill(~self._top_groups(group_scores), 0.0)
        top, idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return idx, (top * self.spec.scaling).to(x.dtype)


class SigmoidGroupRouter(_Fp32Router):
    """DeepSeek-V3: sigmoid scores; experts chosen on score + ``e_score_correction_bias`` within the
    ``topk_group`` groups whose two best biased scores sum highest; weights are the unbiased scores of the
    chosen, renormalised when ``normalize``, times ``scaling``."""

    def __init__(self, d_model: int, experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 normalize: bool = True, scaling: float = 1.0) -> None:
        spec = RouterSpec("sigmoid_group", normalize=normalize, scaling=scaling, n_group=n_group,
                          topk_group=topk_group)
        super().__init__(d_model, experts, top_k, spec)
        self.weight = nn.Parameter(torch.empty(experts, d_model, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(experts, dtype=torch.float32))
        _init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        scores = self._logits(x).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        g = self.spec.n_group
        if g > 1:
            per_group = choice.view(-1, g, self.num_experts // g)
            group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
            choice = choice.masked_fill(~self._top_groups(group_scores), float("-inf"))
        idx = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        top = scores.gather(1, idx)
        if self.spec.normalize:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, (top * self.spec.scaling).to(x.dtype)


class TopKSoftmaxRouter(_Router):
    """gpt-oss: logits of a Linear with a bias, top-k of the logits, softmax over those k only."""

    def __init__(self, d_model: int, experts: int, top_k: int) -> None:
        super().__init__(d_model, experts, top_k, RouterSpec("topk_softmax"))
        self.weight = nn.Parameter(torch.empty(experts, d_model))
        self.bias = nn.Parameter(torch.zeros(experts))
        _init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.reshape(-1, self.d_model), self.weight, self.bias)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        return idx, torch.softmax(top, dim=-1, dtype=top.dtype).to(x.dtype)


ROUTERS: dict[str, type[_Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "dbrx": DbrxRouter,
    "deepseek_v2": DeepseekV2Router,
    "sigmoid_group": SigmoidGroupRouter,
    "topk_softmax": TopKSoftmaxRouter,
}


def build_router(arch: Arch) -> nn.Module:
    """The router module of ``arch``'s MoE layer (fresh random weights)."""
    r, d, e, k = arch.router, arch.d_model, arch.experts, arch.top_k
    if r.kind == "softmax_topk":
        return SoftmaxTopKRouter(d, e, k, normalize=r.normalize)
    if r.kind == "dbrx":
        return DbrxRouter(d, e, k, normalize=r.normalize)
    if r.kind == "deepseek_v2":
        return DeepseekV2Router(d, e, k, scaling=r.scaling, n_group=r.n_group, topk_group=r.topk_group)
    if r.kind == "sigmoid_group":
        return SigmoidGroupRouter(d, e, k, n_group=r.n_group, topk_group=r.topk_group, normalize=r.normalize,
                                  scaling=r.scaling)
    return TopKSoftmaxRouter(d, e, k)
