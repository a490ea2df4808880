"""Execution strategies: different ways to run the same stacked expert weights.

A strategy is one function ``(x [T, d], expert_idx [T, k], gate_w [T, k], experts) -> y [T, out]``
registered by name. All return the same outputs (tests hold them to 1e-4 in fp32).

``masked_loop`` and ``active_loop`` replicate the seed's two implementations, host syncs and all: they
are the baseline the fast strategies are measured against, so they keep their Python loops on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class ExpertStack(NamedTuple):
    """Stacked expert weights: ``weights[l]`` is [E, out_l, in_l] (nn.Linear layout), ``biases[l]`` [E, out_l]."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]

    @property
    def num_experts(self) -> int:
        return self.weights[0].shape[0]

    @property
    def out_dim(self) -> int:
        return self.weights[-1].shape[1]

    def run_one(self, e: int, h: Tensor) -> Tensor:
        """Expert e on its tokens: h [n, d] -> [n, out]."""
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = F.linear(h, w[e], b[e])
            if layer < last:
                h = F.relu(h)
        return h


Strategy = Callable[[Tensor, Tensor, Tensor, ExpertStack], Tensor]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


@register("masked_loop")
def masked_loop(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertStack) -> Tensor:
    """The seed's naive MoE: visit every expert, select its tokens with a boolean mask."""
    y = x.new_zeros(x.shape[0], ex.out_dim)  # [T, out]
    for e in range(ex.num_experts):
        mask = expert_idx == e  # [T, k]
        rows = mask.any(dim=-1)  # [T]
        if not bool(rows.any()):  # host sync, as in the seed
            continue
        w = (gate_w * mask).sum(dim=-1)[rows]  # [n] this expert's gate weight per token
        y[rows] += w[:, None] * ex.run_one(e, x[rows])
    return y


@register("active_loop")
def active_loop(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertStack) -> Tensor:
    """The seed's optimized MoE: loop only over experts that received tokens."""
    y = x.new_zeros(x.shape[0], ex.out_dim)  # [T, out]
    for e in expert_idx.unique().tolist():  # host sync, as in the seed
        token, slot = (expert_idx == e).nonzero(as_tuple=True)  # [n], [n]
        y.index_add_(0, token, gate_w[token, slot, None] * ex.run_one(e, x[token]))
    return y


class Routing(NamedTuple):
    """(token, expert) pairs sorted by expert, all on the device."""

    token: Tensor  # [T*k] token of each sorted pair
    expert: Tensor  # [T*k] expert of each sorted pair (non-decreasing)
    weight: Tensor  # [T*k] gate weight of each sorted pair
    starts: Tensor  # [E] first pair of each expert
    ends: Tensor  # [E] one past the last pair of each expert (int32: grouped_mm's offsets)


def sort_by_expert(expert_idx: Tensor, gate_w: Tensor, num_experts: int) -> Routing:
    """Sort pairs by expert without a host sync (searchsorted, not bincount/unique)."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # [T*k]
    expert = flat[order]  # [T*k]
    ids = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)  # [E]
    starts = torch.searchsorted(expert, ids, right=False)  # [E]
    ends = torch.searchsorted(expert, ids, right=True, out_int32=True)  # [E]
    return Routing(order // k, expert, gate_w.reshape(-1)[order], starts, ends)


def combine(rows: Tensor, r: Routing, num_tokens: int) -> Tensor:
    """Weighted scatter-add of per-pair expert outputs back to tokens: rows [T*k, out] -> [T, out]."""
    out = rows.new_zeros(num_tokens, rows.shape[1])
    return out.index_add_(0, r.token, rows * r.weight[:, None])


@register("grouped")
def grouped(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertStack) -> Tensor:
    """Sorted pairs, one grouped GEMM per layer, one scatter-add: no Python loop over experts, no sync."""
    r = sort_by_expert(expert_idx, gate_w, ex.num_experts)
    h = x[r.token]  # [T*k, d]
    last = len(ex.weights) - 1
    for layer, (w, b) in enumerate(zip(ex.weights, ex.biases)):
        # w [E, out, in] -> transposed view [E, in, out]: its strides stay 16-byte aligned
        h = F.grouped_mm(h, w.transpose(-2, -1), offs=r.ends) + b[r.expert]  # [T*k, out]
        if layer < last:
            h = F.relu(h)
    return combine(h, r, x.shape[0])


def padded_forward(
    x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertStack, capacity: int | None
) -> tuple[Tensor, Tensor]:
    """Pairs packed into a padded [E, C, d] buffer and run with one baddbmm per layer.

    ``capacity=None`` is exact mode (C = the largest count: one host sync); a fixed C keeps shapes
    static (graph-capturable) and drops the pairs past C. Returns (y [T, out], dropped pairs []).
    """
    E = ex.num_experts
    r = sort_by_expert(expert_idx, gate_w, E)
    pair = torch.arange(r.expert.shape[0], device=x.device)  # [T*k]
    rank = pair - r.starts[r.expert]  # [T*k] position of each pair inside its expert's group
    if capacity is None:
        capacity = int((r.ends - r.starts).max())  # exact mode: the one host sync
    slot = rank.clamp(max=capacity)  # [T*k] dropped pairs all land in the spare slot C
    dropped = (rank >= capacity).sum()  # [] stays on the device
    h = x.new_zeros(E, capacity + 1, x.shape[1])  # [E, C+1, d]
    h[r.expert, slot] = x[r.token]
    h = h[:, :capacity]  # [E, C, d]
    last = len(ex.weights) - 1
    for layer, (w, b) in enumerate(zip(ex.weights, ex.biases)):
        h = torch.baddbmm(b[:, None, :], h, w.transpose(-2, -1))  # [E, C, out]
        if layer < last:
            h = F.relu(h)
    h = torch.cat([h, h.new_zeros(E, 1, h.shape[2])], dim=1)  # [E, C+1, out]: spare slot reads 0
    return combine(h[r.expert, slot], r, x.shape[0]), dropped


@register("padded")
def padded(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertStack) -> Tensor:
    """Padded batched GEMM, exact capacity (no pair dropped)."""
    return padded_forward(x, expert_idx, gate_w, ex, capacity=None)[0]
