"""Which experts the benchmark's tokens reach, and counting it on the device.

An untrained router on random hidden states routes neither like a trained model nor evenly, so the routing is
a choice of the run (``--routing``):

  random        the router's own top-k (random router weights, fixed-seed inputs): the default
  balanced      pair p = t*k + j goes to expert perm[p mod E]: every expert gets T*k/E pairs (floor or ceil),
                a token's k experts are distinct (k <= E), ``perm`` a seeded permutation
  skewed:ALPHA  each token draws k distinct experts, expert of popularity rank r weighted r^-ALPHA (Zipf), the
                ranks a seeded permutation; drawn by Gumbel-top-k (exact sampling without replacement, done in
                log space so that no weight underflows at a large ALPHA)

balanced and skewed keep the router: its forward still runs, so its cost stays in the measurement, and its k
weights are kept, paired with the fixed experts; only *which* experts is replaced. The assignment depends on
(T, E, k, seed) alone and is made once per token count, outside the timed window (the first forward of a
shape, which the window's warm-up or ``prepare`` makes).

``BenchRouter`` also counts the (token, expert) pairs each expert receives into an [E] int64 buffer with
``index_add_`` (``torch.bincount`` syncs on CUDA to size its output): no host sync in a window; the counts
are read after it (``read_load``). The benchmark's inputs are fixed, so every forward of a window routes alike
and the union over the window equals one forward's routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

ROUTING_KINDS = ("random", "balanced", "skewed")
ROUTING_HELP = "random | balanced | skewed:ALPHA (Zipf exponent ALPHA > 0, e.g. skewed:1.2)"
MAX_ALPHA = 100.0  # past this the first expert takes every token it can: a typo, not a distribution


@dataclass(frozen=True)
class RoutingMode:
    """A parsed ``--routing``: ``kind`` one of ROUTING_KINDS, ``alpha`` the Zipf exponent (skewed only)."""

    kind: str = "random"
    alpha: float | None = None

    @property
    def text(self) -> str:
        return f"skewed:{self.alpha:g}" if self.kind == "skewed" else self.kind

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.text, "kind": self.kind, "zipf_alpha": self.alpha}


def parse_routing(text: Any) -> RoutingMode:
    """``--routing`` text as a RoutingMode, or a one-line ConfigError saying what is accepted."""
    if not isinstance(text, str):
        raise ConfigError(f"--routing {text!r} must be text: {ROUTING_HELP}")
    kind, sep, arg = text.strip().partition(":")
    if kind in ("random", "balanced") and not sep:
        return RoutingMode(kind)
    if kind != "skewed":
        raise ConfigError(f"--routing {text!r} is unknown; choose {ROUTING_HELP}")
    try:
        alpha = float(arg)
    except ValueError:
        raise ConfigError(f"--routing {text!r}: the Zipf exponent {arg!r} is not a number; e.g. skewed:1.2") \
            from None
    if not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise ConfigError(f"--routing {text!r}: the Zipf exponent must be a number > 0 and <= {MAX_ALPHA:g}; "
                          "e.g. skewed:1.2 (use 'balanced' or 'random' for no skew)")
    return RoutingMode("skewed", alpha)


def _generator(seed: int, tokens: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + tokens)  # one stream per (seed, T)


def balanced_assignment(tokens: int, experts: int, top_k: int, seed: int = 0) -> Tensor:
    """[T, k] int64: pairs dealt round-robin over a seeded permutation of the experts."""
    perm = torch.randperm(experts, generator=_generator(seed, tokens))  # [E]
    pair = torch.arange(tokens * top_k).view(tokens, top_k)  # [T, k]: consecutive, so a token's k are distinct
    return perm[pair % experts]


def zipf_assignment(tokens: int, experts: int, top_k: int, alpha: float, seed: int = 0) -> Tensor:
    """[T, k] int64: k distinct experts per token, rank r drawn with weight r^-alpha (Gumbel-top-k)."""
    g = _generator(seed, tokens)
    rank_of = torch.randperm(experts, generator=g)  # [E] popularity rank (0 = most popular) of each expert
    log_w = -alpha * torch.log1p(rank_of.double())  # [E] log of (rank + 1)^-alpha
    u = torch.rand(tokens, experts, generator=g, dtype=torch.float64).clamp_(1e-300, 1.0)  # [T, E]
    keys = log_w - torch.log(-torch.log(u))  # [T, E]: log weight + Gumbel noise
    return keys.topk(top_k, dim=-1).indices  # [T, k]


def assignment(mode: RoutingMode, tokens: int, experts: int, top_k: int, seed: int = 0) -> Tensor | None:
    """The fixed [T, k] assignment of ``mode`` (on the CPU), or None for the router's own choice."""
    if mode.kind == "balanced":
        return balanced_assignment(tokens, experts, top_k, seed)
    if mode.kind == "skewed":
        assert mode.alpha is not None
        return zipf_assignment(tokens, experts, top_k, mode.alpha, seed)
    return None


class BenchRouter(nn.Module):
    """A router as the benchmark runs it: the wrapped router's forward, its experts replaced by ``mode``'s
    fixed assignment (balanced, skewed), and the pairs per expert counted on the device.

    On rank ``rank`` of an expert-parallel job of ``world`` ranks, a fixed routing assigns the job's forward of
    W*T tokens as one process assigns W*T, this rank's T tokens taking rows [rank*T, (rank+1)*T): each rank alone
    would deal its T tokens to the very experts every other rank deals them to."""

    def __init__(self, router: nn.Module, experts: int, top_k: int, mode: RoutingMode, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        super().__init__()
        self.router, self.num_experts, self.top_k, self.mode, self.seed = router, experts, top_k, mode, seed
        self.rank, self.world = rank, world
        self.register_buffer("expert_pairs", torch.zeros(experts, dtype=torch.long), persistent=False)  # [E]
        self.register_buffer("_one", torch.ones(1, dtype=torch.long), persistent=False)  # [1]
        self._fixed: dict[tuple[int, str], Tensor] = {}  # (T, device) -> [T, k]

    def fixed_for(self, tokens: int, device: torch.device) -> Tensor | None:
        """This rank's [T, k] assignment on ``device``, made on first use of ``tokens`` (host work, then cached)."""
        key = (tokens, str(device))
        if key not in self._fixed:
            job = assignment(self.mode, self.world * tokens, self.num_experts, self.top_k, self.seed)  # [W*T, k]
            if job is None:
                return None
            self._fixed[key] = job[self.rank * tokens:(self.rank + 1) * tokens].to(device)  # [T, k]
        return self._fixed[key]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        idx, w = self.router(x)  # [T, k], [T, k]: the router's cost is always paid
        if self.mode.kind != "random":
            fixed = self.fixed_for(x.shape[0], x.device)  # shapes only: no sync
            assert fixed is not None
            idx = fixed
        flat = idx.reshape(-1)  # [T*k]
        self.expert_pairs.index_add_(0, flat, self._one.expand(flat.shape[0]))  # on the device, no sync
        return idx, w

    def reset_load(self) -> None:
        self.expert_pairs.zero_()

    def extra_repr(self) -> str:
        return f"routing={self.mode.text!r}, experts={self.num_experts}, top_k={self.top_k}, seed={self.seed}"


@dataclass(frozen=True)
class Load:
    """Pairs per expert over a window, reduced: what a record says about the routing it measured."""

    experts_touched: int  # experts that received at least one pair
    max_over_mean: float  # busiest expert's pairs / the mean over all E (1.0 = perfectly balanced)
    forwards: float  # forwards the counts cover (pairs / (T*k))
    max_pairs_per_forward: float  # the busiest expert's pairs in one forward

    def as_dict(self) -> dict[str, Any]:
        return {"experts_touched": self.experts_touched, "expert_load_max_over_mean": self.max_over_mean,
                "expert_load_max_pairs_per_forward": self.max_pairs_per_forward}


def read_load(router: BenchRouter, tokens: int) -> Load | None:
    """The counted load (one host sync: call it after the window), or None if nothing was routed."""
    counts = router.expert_pairs.tolist()  # [E]
    total = sum(counts)
    if total == 0 or tokens <= 0:
        return None
    forwards = total / (tokens * router.top_k)
    mean = total / len(counts)
    return Load(sum(1 for c in counts if c > 0), max(counts) / mean, forwards, max(counts) / forwards)
