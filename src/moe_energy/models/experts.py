"""Expert families: the per-expert math behind one small interface, so a strategy never knows which it runs.

A strategy (``strategies.py``) owns dispatch and combine: which rows reach which expert, and how outputs
are weighted back to tokens. A family owns what one expert computes, in the four shapes strategies ask for:

  run_one(e, h [n, d]) -> [n, out]                      one expert on its tokens (the seed's loops)
  run_batched(h [E, C, d]) -> [E, C, out]               every expert on its own rows (padded, dense_experts)
  run_grouped(h [R, d], r) -> [R, out]                  rows sorted by expert, token-major grouped_mm (grouped)
  run_grouped_fm(h [d, P], a, onehot [E, P]) -> [out, P]  the same feature-major, groups padded (grouped_fm)

Families are NamedTuples of stacked tensors (one per projection, experts first) built on every forward:
cheap, and ``_replace`` gives a copy with another capacity factor or counters.

grouped_mm needs every stride of its operands 16-byte aligned: here that means d and the widths between
projections (hidden, I) a multiple of 4 fp32 / 8 bf16 elements, true of every real LLM. A shape that is not
makes grouped_mm raise; ``auto`` records that and keeps another candidate, and ``MoE.set_layout`` keeps the
ReLU family's weights in a layout that stays aligned where one exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # strategies.py imports this module: the routing types are only annotations here
    from .strategies import AlignedRouting, Routing

from .kernels import grouped_linear, grouped_mm
from .quant import QWeight, dequantize, round_rows
from .quant import grouped_linear as qgrouped_linear
from .quant import linear as qlinear

ACTIVATIONS = ("silu", "gpt_oss")


class ExpertFamily(Protocol):
    """What every strategy may ask of the experts. ``counters`` ([2] int64: routed pairs, dropped pairs) is
    where capacity strategies add their counts on the device; whoever owns it reads it outside timed windows."""

    @property
    def num_experts(self) -> int: ...
    @property
    def out_dim(self) -> int: ...
    @property
    def weights(self) -> tuple[Tensor, ...]: ...  # the stacked weight tensors (auto's cache key reads shapes)
    @property
    def capacity_factor(self) -> float: ...
    @property
    def counters(self) -> Tensor | None: ...
    def run_one(self, e: int, h: Tensor) -> Tensor: ...
    def run_batched(self, h: Tensor) -> Tensor: ...
    def run_grouped(self, h: Tensor, r: Routing) -> Tensor: ...
    def run_grouped_fm(self, h: Tensor, a: AlignedRouting, onehot: Tensor) -> Tensor: ...


class ReluMLPExperts(NamedTuple):
    """The seed's experts: chains of nn.Linear with ReLU between, ``weights[l]`` [E, out_l, in_l] (nn.Linear
    layout, stacked over experts), ``biases[l]`` [E, out_l]."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    capacity_factor: float = 1.25
    counters: Tensor | None = None

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

    def run_batched(self, h: Tensor) -> Tensor:
        """Every expert on its own rows: h [E, C, d] -> [E, C, out], one batched GEMM per layer."""
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b[:, None, :], h, w.transpose(-2, -1))  # [E, C, out_l]
            if layer < last:
                h = h.relu_()  # in place: baddbmm's backward needs its inputs, not its output
        return h

    def run_grouped(self, h: Tensor, r: Routing) -> Tensor:
        """Rows sorted by expert: h [R, in] -> [R, out], one grouped GEMM a layer (``r.ends`` the groups' ends,
        ``r.expert`` each row's expert)."""
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            # grouped_mm reads w [E, out, in] as [E, in, out], strides 16-byte aligned (moe.py keeps them so)
            h = grouped_linear(h, w, r.ends, b, r.expert)  # [R, out]
            if layer < last:
                h = h.relu_()
        return h

    def run_grouped_fm(self, h: Tensor, a: AlignedRouting, onehot: Tensor) -> Tensor:
        """Feature-major: h [in, P] -> [out, P], one grouped_mm (3D weights x 2D h) per layer; ``onehot`` [E, P]
        is each column's expert, for the bias."""
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = grouped_mm(w, h, offs=a.offs)  # [E, out, in] x [in, P] -> [out, P]
            h = h.addmm_(b.t(), onehot)  # each column's expert bias: [out, E] @ [E, P]
            if layer < last:
                h = h.relu_()
        return h


ExpertStack = ReluMLPExperts  # the seed's name, still used by moe.py's callers, selfcheck and the tests


def split_gate_up(h: Tensor, dim: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The gate and up halves of a gate_up projection along ``dim``: [gate; up] concatenated (Mixtral, Qwen,
    DeepSeek) or interleaved gate0, up0, gate1, ... (gpt-oss). Views, no copy."""
    n = h.shape[dim] // 2  # from the shape, not -1: an empty batch has no elements to infer from
    if interleaved:
        pairs = h.unflatten(dim, (n, 2))  # [..., I, 2, ...]
        gate, up = pairs.unbind(dim + 1 if dim >= 0 else dim)
        return gate, up
    return h.narrow(dim, 0, n), h.narrow(dim, n, n)


class SwiGLUExperts(NamedTuple):
    """LLM experts, down(act(gate x) * up x), stacked as transformers 5 stores them so weights copy 1:1:

    gate_up [E, 2I, d] (nn.Linear layout; gpt-oss stores [E, d, 2I]: pass its ``.transpose(1, 2)`` view),
    down [E, d, I] (gpt-oss: [E, I, d], pass the transposed view), optional biases gate_up_bias [E, 2I] and
    down_bias [E, d]. ``act="silu"``: silu(gate) * up. ``act="gpt_oss"``: gpt-oss's clamped SwiGLU,
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = clamp(gate, max=limit).
    """

    gate_up: Tensor
    down: Tensor
    gate_up_bias: Tensor | None = None
    down_bias: Tensor | None = None
    act: str = "silu"
    limit: float = 7.0
    alpha: float = 1.702
    interleaved: bool = False  # gate/up rows alternate (gpt-oss) rather than [gate; up]
    capacity_factor: float = 1.25
    counters: Tensor | None = None
    gate_up_scale: Tensor | None = None  # int8/fp8 weights (models.quant): gate_up, down, these [E, 2I], [E, d]
    down_scale: Tensor | None = None
    acts: bool = False  # w8a8, fp8: each row of activations rounded before each projection (models.quant)
    packs: tuple | None = None  # w8a8 on a CPU: fbgemm's packed (gate_up, down), one per expert each

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def out_dim(self) -> int:
        return self.down.shape[1]

    @property
    def weights(self) -> tuple[Tensor, ...]:
        return (self.gate_up, self.down)

    def glu(self, h: Tensor, dim: int = -1) -> Tensor:
        """The gated activation of a gate_up output, [.., 2I, ..] -> [.., I, ..] along ``dim``."""
        gate, up = split_gate_up(h, dim, self.interleaved)
        if self.act == "silu":
            return F.silu(gate) * up
        if self.act == "gpt_oss":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        raise ValueError(f"unknown SwiGLU activation {self.act!r}; choose from {', '.join(ACTIVATIONS)}")

    def _q(self, i: int) -> QWeight:
        """Projection i (0: gate_up, 1: down) as quantized weights."""
        w, s = (self.gate_up, self.gate_up_scale) if i == 0 else (self.down, self.down_scale)
        assert s is not None
        return QWeight(w, s, self.acts, None if self.packs is None else self.packs[i])

    def _rows(self, h: Tensor, dim: int = -1) -> Tensor:
        """h as a projection reads it: w8a8 and fp8 round each row (along ``dim``), else h itself."""
        return round_rows(h, dim, like=self.gate_up) if self.acts else h

    def _dense(self) -> tuple[Tensor, Tensor]:
        """(gate_up, down) as float weights in the activations' dtype: int8 ones dequantized (paths with no int8
        kernel of their own: the batched GEMMs, grouped_mm feature-major)."""
        if self.gate_up_scale is None or self.down_scale is None:
            return self.gate_up, self.down
        return dequantize(QWeight(self.gate_up, self.gate_up_scale)), dequantize(QWeight(self.down, self.down_scale))

    def run_one(self, e: int, h: Tensor) -> Tensor:
        """Expert e on its tokens: h [n, d] -> [n, d]."""
        gb, db = self.gate_up_bias, self.down_bias
        if self.gate_up_scale is not None and self.down_scale is not None:
            h = qlinear(h, self._q(0)[e], None if gb is None else gb[e])  # [n, 2I]
            return qlinear(self.glu(h), self._q(1)[e], None if db is None else db[e])  # [n, d]
        h = F.linear(h, self.gate_up[e], None if gb is None else gb[e])  # [n, 2I]
        return F.linear(self.glu(h), self.down[e], None if db is None else db[e])  # [n, d]

    def run_batched(self, h: Tensor) -> Tensor:
        """Every expert on its own rows: h [E, C, d] -> [E, C, d], two batched GEMMs."""
        gate_up, down = self._dense()
        h = bmm_bias(self._rows(h), gate_up.to(h.dtype).transpose(-2, -1), self.gate_up_bias)  # [E, C, 2I]
        return bmm_bias(self._rows(self.glu(h)), down.to(h.dtype).transpose(-2, -1), self.down_bias)  # [E, C, d]

    def run_grouped(self, h: Tensor, r: Routing) -> Tensor:
        """Rows sorted by expert: h [R, d] -> [R, d], two grouped GEMMs (``kernels.grouped_linear``; int8 weights:
        ``quant.grouped_linear``)."""
        if self.gate_up_scale is not None and self.down_scale is not None:
            h = qgrouped_linear(h, self._q(0), r.ends, self.gate_up_bias, r.expert)  # [R, 2I]
            return qgrouped_linear(self.glu(h), self._q(1), r.ends, self.down_bias, r.expert)  # [R, d]
        h = grouped_linear(h, self.gate_up, r.ends, self.gate_up_bias, r.expert)  # [R, 2I]
        return grouped_linear(self.glu(h), self.down, r.ends, self.down_bias, r.expert)  # [R, I] -> [R, d]

    def run_grouped_fm(self, h: Tensor, a: AlignedRouting, onehot: Tensor) -> Tensor:
        """Feature-major: h [d, P] -> [d, P]; ``onehot`` [E, P] is each column's expert, for the biases."""
        gate_up, down = self._dense()
        h = grouped_mm(gate_up.to(h.dtype), self._rows(h, 0), offs=a.offs)  # [E, 2I, d] x [d, P] -> [2I, P]
        if self.gate_up_bias is not None:
            h = h.addmm_(self.gate_up_bias.t(), onehot)  # [2I, E] @ [E, P]
        h = grouped_mm(down.to(h.dtype), self._rows(self.glu(h, dim=0), 0), offs=a.offs)  # [E, d, I] x [I, P] -> [d, P]
        if self.down_bias is not None:
            h = h.addmm_(self.down_bias.t(), onehot)  # [d, E] @ [E, P]
        return h


def bmm_bias(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """h [E, C, in] @ w [E, in, out] (+ b [E, out]) -> [E, C, out]."""
    return torch.bmm(h, w) if b is None else torch.baddbmm(b[:, None, :], h, w)
