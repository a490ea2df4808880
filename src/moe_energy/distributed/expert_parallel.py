"""The expert-parallel MoE: an MoE module (the seed's ``MoE`` or an LLM ``MoELayer``) with its experts sharded
over the ranks, tokens moved by all-to-all. Routing is the module's own (``MoE.route``, the layer's router),
the local experts run the ``grouped`` strategy's chain over the module's own expert family
(``ExpertFamily.run_grouped``) and the outputs come back through the strategies' ``combine``: only the
exchange of tokens is this module's own. What the path reads of each kind of MoE module is one small class
(``SeedParts``, ``LayerParts``), so a new kind of MoE module is one class here, not a second path.

Shared experts (DeepSeek, Qwen) are replicated: every rank holds them whole (rank 0's weights, broadcast)
and runs them on its own tokens, as the dense baselines run data-parallel. They are always on, so sharding
them would move every token, not k of E; DeepSeek-V3's serving keeps them beside each rank's attention too.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.experts import ExpertFamily
from ..models.llm import MoELayer
from ..models.moe import MoE
from ..models.strategies import combine, sort_by_expert
from .group import Group, broadcast_module, broadcast_rows, check_divisible, collective

M = TypeVar("M", bound=nn.Module)
EP_STRATEGY = "grouped"  # the local experts' strategy: no loop over experts, no host sync of its own
MOE_LABEL = "moe[expert_parallel]"


@dataclass
class CommStats:
    """Time and bytes of this rank's all-to-alls since the last ``reset``.

    On CUDA each collective is bracketed by events, read only once they have completed (no host sync
    added); on CPU/gloo the collective blocks, so a perf_counter around it is exact.
    """

    seconds: float = 0.0
    bytes_sent: int = 0  # to other ranks: what crosses the interconnect
    bytes_local: int = 0  # this rank's own slice: a copy, not traffic
    calls: int = 0
    _pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def reset(self) -> None:
        self.seconds, self.bytes_sent, self.bytes_local, self.calls = 0.0, 0, 0, 0
        self._pending.clear()

    def harvest(self, wait: bool = False) -> None:
        """Add up the CUDA event pairs that have completed (all of them with ``wait``, after a sync)."""
        keep = []
        for a, b in self._pending:
            if wait or b.query():
                self.seconds += a.elapsed_time(b) / 1e3
            else:
                keep.append((a, b))
        self._pending[:] = keep

    def as_dict(self) -> dict[str, float | int]:
        return {"all_to_all_seconds": self.seconds, "all_to_all_bytes": self.bytes_sent,
                "all_to_all_local_bytes": self.bytes_local, "all_to_all_calls": self.calls}


class MoEParts(Generic[M]):
    """What the expert-parallel path reads of one kind of MoE module: its expert count and k, its routing,
    its expert family, any always-on output, and which submodules hold the stacked [E, ...] expert tensors."""

    stacked: tuple[str, ...] = ()  # submodules whose every parameter is an [E, ...] stack over the experts

    def __init__(self, module: M) -> None:
        self.module = module

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, d] -> expert_idx [T, k] int64, gate_w [T, k] in x.dtype: the module's own ``route``."""
        return self.module.route(x)  # type: ignore[no-any-return]

    def stack(self) -> ExpertFamily:
        """The module's experts as its family (after ``shard_moe``: this rank's experts only)."""
        return self.module.stack()  # type: ignore[no-any-return]

    def always_on(self, x: Tensor) -> Tensor | None:
        """What every token gets besides its routed experts (shared experts), [T, out]; None: nothing."""
        return None


class SeedParts(MoEParts[MoE]):
    """The seed's classifier MoE: a linear gate, ReLU MLP experts as ``weights[l]``/``biases[l]``."""

    stacked = ("weights", "biases")

    @property
    def num_experts(self) -> int:
        return self.module.experts

    @property
    def top_k(self) -> int:
        return self.module.top_k


class LayerParts(MoEParts[MoELayer]):
    """An LLM ``MoELayer``: its own router (a ``BenchRouter`` counts this rank's pairs), SwiGLU experts
    stacked in ``experts`` (gate_up_proj [E, 2I, d], down_proj [E, d, I], biases), shared experts replicated."""

    stacked = ("experts",)

    @property
    def num_experts(self) -> int:
        return self.module.num_experts

    @property
    def top_k(self) -> int:
        return self.module.dims().top_k

    def always_on(self, x: Tensor) -> Tensor | None:
        shared = self.module.shared
        return None if shared is None else shared(x)  # [T, d]


def parts_of(module: nn.Module) -> SeedParts | LayerParts:
    if isinstance(module, MoELayer):
        return LayerParts(module)
    if isinstance(module, MoE):
        return SeedParts(module)
    raise TypeError(f"expert parallelism runs an MoE or an MoELayer, not {type(module).__name__}")


@torch.no_grad()
def shard_moe(moe: nn.Module, g: Group) -> nn.Module:
    """A copy of rank 0's ``moe`` (an MoE or an MoELayer) on this rank's device holding only this rank's experts.

    The copy shares ``moe``'s expert tensors only until each is replaced by its broadcast slice, so the
    whole MoE is never held twice; ``moe`` itself is left as it was. Everything else (router or gate, shared
    experts, buffers) is rank 0's, whole. The copy's routing is the module's; its ``stack()`` is the local
    experts. Never call the copy itself: its forward would route to all E experts but find only E/W.
    """
    parts = parts_of(moe)
    check_divisible(parts.num_experts, g.world_size)
    n = parts.num_experts // g.world_size
    experts = [p for name in parts.stacked for p in getattr(moe, name).parameters()]
    shard = copy.deepcopy(moe, {id(p): p for p in experts})  # router and buffers copied, experts shared
    local: set[int] = set()
    for name in parts.stacked:
        holder = getattr(shard, name)
        for pname, p in list(holder.named_parameters(recurse=False)):
            mine = nn.Parameter(broadcast_rows(p, g, g.rank * n, n))  # [E_local, ...]
            setattr(holder, pname, mine)
            local.add(id(mine))
    shard.to(g.device)  # router, shared experts and buffers (the slices are there already)
    broadcast_module(shard, g, skip=local)
    return shard.requires_grad_(False)


class ExpertParallelMoE(nn.Module):
    """x [T, in] -> [T, out], the same function as the MoE module it shards (the seed's ``MoE``: logits
    [T, classes]; an ``MoELayer``: hidden states [T, d]); rank r holds experts [r*E/W, (r+1)*E/W).

    Inference only (the collectives are not differentiated). Every rank must call ``forward`` the same
    number of times: each call is three collectives.
    """

    def __init__(self, shard: nn.Module, g: Group) -> None:
        super().__init__()
        self.g = g
        self.moe = shard  # rank 0's router and shared experts, this rank's experts (``shard_moe``)
        self.parts = parts_of(shard)
        self.experts, self.top_k = self.parts.num_experts, self.parts.top_k
        self.local_experts = self.parts.stack().num_experts
        check_divisible(self.experts, g.world_size)
        if self.local_experts * g.world_size != self.experts:
            raise ValueError(f"the shard holds {self.local_experts} experts, not {self.experts} / {g.world_size}")
        self.first_expert = g.rank * self.local_experts
        self.stats = CommStats()
        self.last_received_pairs = 0  # (token, expert) pairs this rank's experts ran in the last forward

    @classmethod
    def from_moe(cls, moe: nn.Module, g: Group) -> ExpertParallelMoE:
        """Rank 0's weights on every rank (broadcast), each rank keeping its own experts' slice."""
        return cls(shard_moe(moe, g), g)

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int] | None = None,
                    in_splits: list[int] | None = None) -> None:
        """One timed all_to_all_single; bytes counted from the host-side split sizes."""
        g, st = self.g, self.stats
        row = math.prod(inp.shape[1:]) * inp.element_size()  # bytes per row (an empty input has no row 0)
        sent = in_splits if in_splits is not None else [inp.shape[0] // g.world_size] * g.world_size
        st.bytes_local += sent[g.rank] * row
        st.bytes_sent += (sum(sent) - sent[g.rank]) * row
        st.calls += 1
        with collective(g, "all-to-all"):
            if inp.is_cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=g.pg)
                b.record()
                st._pending.append((a, b))
            else:
                t0 = time.perf_counter()
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=g.pg)
                st.seconds += time.perf_counter() - t0

    def _run_local(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [R, in] in arrival order (by source rank, then local expert); counts [W, E_local] -> [R, out]."""
        El, R = self.local_experts, rows.shape[0]
        ids = torch.arange(El, device=rows.device).repeat(self.g.world_size)  # [W*E_local] expert of each count
        local = ids.repeat_interleave(counts.reshape(-1), output_size=R)  # [R], sizes known: no sync
        r = sort_by_expert(local[:, None], rows.new_ones(R, 1), El)  # rows regrouped by local expert
        h = self.parts.stack().run_grouped(rows.index_select(0, r.token), r)  # this rank's experts: [R, out] by expert
        return torch.empty_like(h).index_copy_(0, r.token, h)  # back to arrival order

    def forward(self, x: Tensor) -> Tensor:
        W, El = self.g.world_size, self.local_experts
        if x.is_cuda:
            self.stats.harvest()
        idx, gate_w = self.parts.route(x)  # [T, k], [T, k]: the module's own routing
        r = sort_by_expert(idx, gate_w, self.experts)  # pairs sorted by expert, hence by owning rank
        send_counts = r.ends.long() - r.starts  # [E] pairs for each global expert
        recv_counts = torch.empty_like(send_counts)  # [W*E_local]: [s*El + j] = pairs from rank s for my expert j
        self._all_to_all(recv_counts, send_counts)
        # the one host sync: all_to_all_single needs the split sizes as Python ints
        send_splits, recv_splits = torch.stack(
            [send_counts.view(W, El).sum(1), recv_counts.view(W, El).sum(1)]).tolist()
        h = x.index_select(0, r.token)  # [P, in] pairs in send order
        self.last_received_pairs = sum(recv_splits)
        rows = x.new_empty(self.last_received_pairs, x.shape[1])  # [R, in]
        self._all_to_all(rows, h, recv_splits, send_splits)
        y = self._run_local(rows, recv_counts.view(W, El))  # [R, out]
        back = y.new_empty(h.shape[0], y.shape[1])  # [P, out] in send order
        self._all_to_all(back, y, send_splits, recv_splits)
        out = combine(back, r, x.shape[0])  # [T, out]
        extra = self.parts.always_on(x)  # shared experts, on this rank's own tokens
        return out if extra is None else out + extra

    def extra_repr(self) -> str:
        return (f"experts={self.experts} ({self.local_experts} on rank {self.g.rank}: "
                f"{self.first_expert}..{self.first_expert + self.local_experts - 1}), top_k={self.top_k}, "
                f"world_size={self.g.world_size}")
