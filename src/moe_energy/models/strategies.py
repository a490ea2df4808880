"""Execution strategies: different ways to run the same stacked expert weights.

A strategy is one function ``(x [T, d], expert_idx [T, k], gate_w [T, k], experts) -> y [T, out]``
registered by name. It owns dispatch and combine; the experts (an ``ExpertFamily`` from ``experts.py``:
the seed's ReLU MLP chains, LLM SwiGLU experts) own the per-expert math, so every strategy runs every
family. All exact strategies return the same outputs (tests hold them to 1e-4 in fp32);
``padded_capacity`` matches them whenever no pair overflows its capacity, and counts the pairs it drops.

``masked_loop`` and ``active_loop`` replicate the seed's two implementations, host syncs and all: they
are the baseline the fast strategies are measured against, so they keep their Python loops on purpose.

The fast ones (after torchtitan's grouped experts, MegaBlocks' padded form and gpt-fast's dense form):
  grouped          pairs sorted by expert, one grouped GEMM per projection; no host sync, no padding.
  grouped_fm       the same GEMMs turned around (feature-major: W [out, in] @ h [in, pairs]), each expert's
                   group padded to a multiple of GROUP_ALIGN (16) columns; faster where the BLAS's small-batch
                   kernels favour that orientation (MKL on this project's 2-core EPYC: ~1.15x `grouped`
                   at the large preset).
  padded           pairs packed into [E, C, d], one batched GEMM per projection; C = largest count (one sync).
  padded_capacity  the same with a fixed C = ceil(factor * T*k / E): static shapes, graph-capturable.
  dense_experts    every expert on every token (one batched GEMM per projection over a stride-0 [E, T, d]
                   view), unchosen experts weighted 0: E/k times the FLOPs, but no routing work at all.
  auto             the fastest exact one for each shape (active_loop included), timed on its first batch by the
                   probe ``runner.prepare`` installs (``set_probe``) and cached; the models never time anything.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

# the families and grouped_mm are re-exported: callers (moe.py, selfcheck, distributed, tests) import them here
from .experts import ExpertFamily, ExpertStack, ReluMLPExperts, SwiGLUExperts, grouped_mm  # noqa: F401

GROUPED_MM = ("grouped", "grouped_fm")  # the strategies built on it (torch.compile traces them in bf16 only)

Strategy = Callable[[Tensor, Tensor, Tensor, ExpertFamily], Tensor]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


# --- the seed's two (slow on purpose) -------------------------------------------------------------


@register("masked_loop")
def masked_loop(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
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
def active_loop(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """The seed's optimized MoE: loop only over experts that received tokens."""
    y = x.new_zeros(x.shape[0], ex.out_dim)  # [T, out]
    for e in expert_idx.unique().tolist():  # host sync, as in the seed
        token, slot = (expert_idx == e).nonzero(as_tuple=True)  # [n], [n]
        y.index_add_(0, token, gate_w[token, slot, None] * ex.run_one(e, x[token]))
    return y


# --- routing helpers (all on the device) ----------------------------------------------------------


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
    expert = flat.index_select(0, order)  # [T*k]
    ids = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)  # [E]
    starts = torch.searchsorted(expert, ids, right=False)  # [E]
    ends = torch.searchsorted(expert, ids, right=True, out_int32=True)  # [E]
    return Routing(order // k, expert, gate_w.reshape(-1).index_select(0, order), starts, ends)


def combine(rows: Tensor, r: Routing, num_tokens: int) -> Tensor:
    """Weighted scatter-add of per-pair expert outputs back to tokens: rows [T*k, out] -> [T, out]."""
    out = rows.new_zeros(num_tokens, rows.shape[1])
    return out.index_add_(0, r.token, rows * r.weight[:, None])


def rank_in_expert(flat: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """flat [N] expert of each pair -> (rank [N] of the pair among its expert's pairs, counts [E]).

    A running count over a one-hot [N, E] table: no sort and no sync, and pairs keep token order inside
    an expert (so capacity drops the latest tokens, as Switch/GShard do).
    """
    hits = flat[:, None] == torch.arange(num_experts, device=flat.device)  # [N, E] bool
    seen = hits.cumsum(0)  # [N, E] int64: pairs of each expert so far
    rank = seen.gather(1, flat[:, None]).squeeze(1) - 1  # [N]
    counts = seen[-1] if flat.shape[0] else seen.new_zeros(num_experts)  # a shape test, not a sync
    return rank, counts


def capacity_for(num_pairs: int, num_experts: int, num_tokens: int, factor: float) -> int:
    """Static per-expert capacity C = ceil(factor * pairs / E), at least 1, at most T (an expert's maximum).

    T bounds it last, so an empty batch gets C = 0: no padding row, since there is no token 0 for one to read.
    """
    return min(num_tokens, max(1, math.ceil(factor * num_pairs / num_experts)))


# --- fast strategies -------------------------------------------------------------------------------


@register("grouped")
def grouped(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """Sorted pairs, one grouped GEMM per projection, one scatter-add: no Python loop over experts, no sync."""
    if x.shape[0] == 0:  # a shape test, not a sync: no work, and no empty grouped_mm for a backend to trip on
        return dense_experts(x, expert_idx, gate_w, ex)
    r = sort_by_expert(expert_idx, gate_w, ex.num_experts)
    h = ex.run_grouped(x.index_select(0, r.token), r)  # [T*k, d] -> [T*k, out]
    return combine(h, r, x.shape[0])


# Columns per expert group in grouped_fm are rounded up to this. MKL's AVX2 kernels walk the token dimension
# in 16-wide tiles: a group that ends mid-tile costs nearly a whole tile, and one of 8 columns or fewer takes
# a path twice as slow as 16 (benchmarks/gemm_orientation.py). Large preset on this project's 2-core EPYC,
# vs active_loop: batch 128 (20-41 pairs an expert), align 8 / 16 -> 1.28x / 1.25x, the same within noise;
# batch 32 (4-12), 0.90x / 1.33x. It also keeps every group 16-byte aligned for CUDA's grouped GEMM.
GROUP_ALIGN = 16


class AlignedRouting(NamedTuple):
    """Sorted pairs laid out in expert groups whose sizes are multiples of GROUP_ALIGN (all on the device)."""

    col: Tensor  # [N] column of each sorted pair
    src: Tensor  # [P] token feeding each column (padding columns read token 0: computed, never read back)
    offs: Tensor  # [E] int32 end column of each group
    col_expert: Tensor  # [P] expert of each column


def align_groups(r: Routing, num_experts: int, align: int = GROUP_ALIGN) -> AlignedRouting:
    """Pad each expert's group of sorted pairs to a multiple of ``align`` columns, with no host sync.

    The column count P = N + E*(align-1), rounded up to ``align``, is the worst case, so every shape is
    static; columns past the last group are never computed by grouped_mm nor read back (they hold whatever
    the allocator gave, which the bias add and the activation pass over harmlessly).
    """
    N = r.token.shape[0]
    dev = r.token.device
    counts = r.ends.long() - r.starts  # [E]
    padded = (counts + align - 1) // align * align  # [E]
    ends = padded.cumsum(0)  # [E]
    P = -(-(N + num_experts * (align - 1)) // align) * align
    shift = ends - padded - r.starts  # [E] group start minus sorted start: how far each expert's pairs move
    col = torch.arange(N, device=dev) + shift.index_select(0, r.expert)  # [N]
    src = torch.zeros(P, dtype=torch.long, device=dev).index_put_((col,), r.token)  # [P]
    col_expert = torch.searchsorted(ends, torch.arange(P, device=dev), right=True).clamp_(max=num_experts - 1)
    return AlignedRouting(col, src, ends.to(torch.int32), col_expert)


@register("grouped_fm")
def grouped_fm(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """Feature-major grouped GEMM: h [features, columns], one grouped_mm (3D weights x 2D h) per projection."""
    if x.shape[0] == 0:  # no token 0 for padding columns to read, and grouped_mm refuses a [out, 0] h
        return dense_experts(x, expert_idx, gate_w, ex)  # [0, out], exact, still on the weights' graph
    E = ex.num_experts
    r = sort_by_expert(expert_idx, gate_w, E)
    a = align_groups(r, E)
    onehot = (a.col_expert[None, :] == torch.arange(E, device=x.device)[:, None]).to(x.dtype)  # [E, P]
    h = x.index_select(0, a.src).t()  # [d, P] view with strides (1, d)
    if (h.stride(1) * h.element_size()) % 16:  # grouped_mm needs 16-byte aligned strides
        h = h.contiguous()
    h = ex.run_grouped_fm(h, a, onehot)  # [out, P]
    return combine(h.t().index_select(0, a.col), r, x.shape[0])  # [N, out] -> [T, out]


def padded_forward(
    x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily, capacity: int | None
) -> tuple[Tensor, Tensor | None]:
    """Pairs packed into a padded [E, C, d] buffer and run with one batched GEMM per projection.

    ``capacity=None`` is exact mode (C = the largest count: one host sync); a fixed C keeps every shape
    static (graph-capturable) and drops the pairs past C, which then add nothing to their token.
    Returns (y [T, out], dropped pairs [] on the device, or None in exact mode).
    """
    T, k = expert_idx.shape
    E = ex.num_experts
    flat = expert_idx.reshape(-1)  # [N = T*k]
    rank, counts = rank_in_expert(flat, E)  # [N], [E]
    token = torch.arange(T * k, device=x.device) // k  # [N] token of each pair
    if capacity is None:  # exact: every pair has a row
        C = int(counts.max())  # the one host sync
        slot = flat * C + rank  # [N] row of each pair in [E*C]
        keep = dropped = None
    else:
        C = capacity
        keep = rank < C  # [N]
        slot = torch.where(keep, flat * C + rank, E * C)  # dropped pairs -> one spare row past the end
        dropped = (~keep).sum()
    src = torch.zeros(E * C + 1, dtype=torch.long, device=x.device)  # [E*C+1] token feeding each row
    src = src.index_put_((slot,), token)  # empty rows read token 0: computed, never read back
    # sizes spelled out, not -1: an empty batch (T = C = 0) has no elements to infer a -1 from
    h = ex.run_batched(x.index_select(0, src[: E * C]).view(E, C, x.shape[1]))  # [E, C, out]
    out = h.shape[2]
    rows = h.view(E * C, out).index_select(0, slot if keep is None else slot.clamp(max=E * C - 1))
    w = gate_w if keep is None else gate_w * keep.view(T, k)  # [T, k] a dropped pair weighs 0
    y = torch.bmm(w.to(rows.dtype)[:, None, :], rows.view(T, k, out)).squeeze(1)  # [T, out]
    return y, dropped


@register("padded")
def padded(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """Padded batched GEMM, exact capacity (no pair dropped)."""
    return padded_forward(x, expert_idx, gate_w, ex, capacity=None)[0]


@register("padded_capacity")
def padded_capacity(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """Padded batched GEMM with C fixed by ``ex.capacity_factor``: no sync at all; overflow is dropped and
    counted into ``ex.counters``."""
    T, k = expert_idx.shape
    C = capacity_for(T * k, ex.num_experts, T, ex.capacity_factor)
    y, dropped = padded_forward(x, expert_idx, gate_w, ex, capacity=C)
    if ex.counters is not None:
        ex.counters[0].add_(T * k)
        ex.counters[1].add_(dropped)
    return y


@register("dense_experts")
def dense_experts(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """Every expert on every token, weighted by a dense [T, E] gate (0 for unchosen experts)."""
    T, E = x.shape[0], ex.num_experts
    h = ex.run_batched(x.expand(E, T, x.shape[1]))  # [E, T, out]: stride-0 batch, no copy of x
    g = x.new_zeros(T, E).scatter_(1, expert_idx, gate_w.to(x.dtype))  # [T, E]
    return torch.bmm(g[:, None, :], h.transpose(0, 1)).squeeze(1)  # [T, 1, E] @ [T, E, out] -> [T, out]


# --- auto: measure, then keep the fastest ---------------------------------------------------------

# Only exact strategies: auto may change the speed, never the answer. active_loop (the seed's loop, host syncs and
# all) is one too: on a CPU in bf16 its per-expert GEMMs beat the grouped chain at some token counts (olmoe-1b-7b at
# 512 tokens: 86 vs 104 ms), and auto must never be slower than a row of its own table.
AUTO_CANDIDATES: tuple[str, ...] = ("grouped", "grouped_fm", "padded", "dense_experts", "active_loop")
SYNCING = ("masked_loop", "active_loop")  # read device values on the host: never inside a captured graph


class AutoChoice(NamedTuple):
    name: str  # the strategy auto runs for this key: the least best_ms
    probe_ms: dict[str, float]  # median ms per forward of each candidate that ran
    best_ms: dict[str, float]  # fastest round of each (load on the host only ever adds time)
    errors: dict[str, str]  # candidates that cannot run here, with the reason
    key: tuple


_AUTO_CACHE: dict[tuple, AutoChoice] = {}


def auto_key(x: Tensor, expert_idx: Tensor, ex: ExpertFamily, candidates: Sequence[str]) -> tuple:
    """What the choice depends on: device, dtype, batch, k, every weight's shape and memory layout."""
    weights = tuple((tuple(w.shape), tuple(w.stride())) for w in ex.weights)
    return (str(x.device), str(x.dtype), x.shape[0], expert_idx.shape[1], weights, tuple(candidates))


Probe = Callable[[Tensor, Tensor, Tensor, ExpertFamily, Sequence[str]], AutoChoice]
_PROBE: list[Probe] = []  # the timing probe: runner.prepare installs it (timing is not the models' concern)


def set_probe(probe: Probe) -> None:
    """Install the function that times the candidates on a batch (``runner.prepare.probe``)."""
    _PROBE[:] = [probe]


def untraced(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, applied on the first call: applying it at import imports torch._dynamo,
    ~2 s of every command's start-up on a small CPU (a probe first called while compiling still runs eagerly)."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


@untraced  # timing is host-side Python: never traced into a graph
def choose(
    x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily, candidates: Sequence[str] = AUTO_CANDIDATES
) -> AutoChoice:
    """The fastest candidate for this (device, dtype, shape, batch), probed once and then cached."""
    key = auto_key(x, expert_idx, ex, candidates)
    hit = _AUTO_CACHE.get(key)
    if hit is None:
        if not _PROBE:
            raise RuntimeError("strategy auto has no timing probe installed: import moe_energy.runner.prepare (the "
                               "runner, the CLI and `import moe_energy`'s API do), or name a strategy")
        hit = _AUTO_CACHE[key] = _PROBE[0](x, expert_idx, gate_w, ex, candidates)
    return hit


def forget_choices() -> None:
    """Drop every cached auto choice (e.g. after the host's load changed)."""
    _AUTO_CACHE.clear()


@register("auto")
def auto(x: Tensor, expert_idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
    """The fastest exact strategy for this device, dtype and shape, measured on first use."""
    return STRATEGIES[choose(x, expert_idx, gate_w, ex).name](x, expert_idx, gate_w, ex)
