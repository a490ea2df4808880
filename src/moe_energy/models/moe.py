"""Mixture of Experts: a linear gate, top-k routing and experts whose weights are stacked per layer.

One set of weights serves every execution strategy: switching ``moe.strategy`` changes how the experts
run, never what they compute.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, kind_of
from .counting import moe_active_params, moe_params
from .experts import ExpertFamily, ReluMLPExperts
from .strategies import AUTO_CANDIDATES, STRATEGIES, AutoChoice, choose

# Physical storage of each [E, out, in] weight: "out_in" is the nn.Linear layout (contiguous), "in_out"
# stores the transpose ([E, in, out] contiguous, as torchtitan's grouped experts do). The values and the
# logical shape are the same; which one multiplies faster depends on the BLAS and the shape (optimize.py
# measures it).
LAYOUTS = ("out_in", "in_out")
SHAPE_FIELDS = ("experts", "hidden", "layers", "top_k", "input_dim", "classes")


def whole_number(where: str, name: str, v: Any, least: int = 1) -> int:
    """``v`` as an int >= ``least``: a float, bool or string here is a slip that torch would report obscurely
    (or, for 1.5, silently truncate), so it is refused with the argument's name."""
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise TypeError(f"{where}: {name}={v!r} is {kind_of(v)}; give a whole number (an int) >= {least}")
    if v < least:
        raise ConfigError(f"{where}: {name}={v!r} must be a whole number >= {least}")
    return int(v)


def positive_number(where: str, name: str, v: Any) -> float:
    """``v`` as a finite float > 0 (nan and inf compare oddly and would poison every size computed from them)."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{where}: {name}={v!r} is {kind_of(v)}; give a finite number > 0")
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}: {name}={v!r} must be a finite number > 0")
    return float(v)


def check_shape(where: str, **dims: Any) -> dict[str, int]:
    """The six shape fields as ints, each >= 1 and top_k <= experts; one-line TypeError/ValueError otherwise."""
    out = {k: whole_number(where, k, v) for k, v in dims.items()}
    if "top_k" in out and "experts" in out and out["top_k"] > out["experts"]:
        raise ConfigError(f"{where}: top_k={out['top_k']} exceeds experts={out['experts']}; "
                          f"choose top_k between 1 and {out['experts']}")
    return out


class StrategyHost:
    """What every MoE module shares about its strategy: the name (auto included), padded_capacity's factor,
    the device counters capacity strategies add to, and running the chosen strategy on a family.

    A host sets ``strategy`` and ``capacity_factor``, registers a ``pair_counts`` buffer ([2] int64, not
    persistent) and an ``auto_candidates`` tuple, and provides ``layout`` (its weights' storage).
    """

    pair_counts: Tensor
    auto_candidates: tuple[str, ...]
    auto_choice: AutoChoice | None

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, name: str) -> None:
        who = type(self).__name__
        if not isinstance(name, str):
            raise TypeError(f"{who}: strategy={name!r} is {kind_of(name)}; give a name, one of {', '.join(STRATEGIES)}")
        if name not in STRATEGIES:
            raise ConfigError(f"{who}: strategy={name!r} is an unknown strategy; choose from {', '.join(STRATEGIES)}")
        self._strategy = name

    @property
    def capacity_factor(self) -> float:
        """padded_capacity's C = ceil(factor * T*k / E)."""
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, factor: float) -> None:
        self._capacity_factor = positive_number(type(self).__name__, "capacity_factor", factor)

    @property
    def layout(self) -> str:
        raise NotImplementedError

    def reset_pair_counts(self) -> None:
        self.pair_counts.zero_()

    def run_experts(self, x: Tensor, idx: Tensor, gate_w: Tensor, ex: ExpertFamily) -> Tensor:
        """The strategy on routed tokens: x [T, d], idx/gate_w [T, k] -> [T, out]; auto picks (and records) one."""
        name = self._strategy
        if name == "auto":
            if x.shape[0] == 0:  # nothing to time: any exact strategy gives [0, out], this one without grouped_mm
                name = "dense_experts"
            else:
                self.auto_choice = choose(x, idx, gate_w, ex, self.auto_candidates)
                name = self.auto_choice.name
        return STRATEGIES[name](x, idx, gate_w, ex)

    def strategy_info(self) -> dict:
        """Strategy facts for the results: what auto chose and measured, and pairs dropped by capacity.

        Reads the device counters (one sync): call it outside any timed window.
        """
        routed, dropped = self.pair_counts.tolist()
        c = self.auto_choice if self._strategy == "auto" else None
        capacity = self._strategy == "padded_capacity"
        return {
            "strategy": self._strategy,
            "resolved_strategy": c.name if c else self._strategy,
            "auto_probe_ms": dict(c.probe_ms) if c else None,
            "auto_probe_best_ms": dict(c.best_ms) if c else None,
            "auto_unavailable": dict(c.errors) if c else None,
            "weight_layout": self.layout,
            "capacity_factor": self.capacity_factor if capacity else None,
            "routed_pairs": routed if capacity else None,
            "dropped_pairs": dropped if capacity else None,
        }


class MoE(StrategyHost, nn.Module):
    """x [T, in] -> logits [T, classes]; each token goes to k of E experts, each an MLP of L hidden layers."""

    def __init__(
        self,
        experts: int,
        hidden: int,
        layers: int,
        top_k: int,
        input_dim: int = 784,
        classes: int = 10,
        strategy: str = "grouped",
        capacity_factor: float = 1.25,
    ) -> None:
        super().__init__()
        shape = check_shape("MoE", experts=experts, hidden=hidden, layers=layers, top_k=top_k,
                            input_dim=input_dim, classes=classes)  # before torch sees a 0, -1 or 1.5
        experts, hidden, layers, top_k = shape["experts"], shape["hidden"], shape["layers"], shape["top_k"]
        input_dim, classes = shape["input_dim"], shape["classes"]
        self.strategy = strategy  # checked before any weight is allocated
        self.capacity_factor = capacity_factor
        self.experts, self.hidden, self.layers, self.top_k = experts, hidden, layers, top_k
        self.input_dim, self.classes = input_dim, classes
        self.gate = nn.Linear(input_dim, experts)
        dims = [input_dim] + [hidden] * layers + [classes]
        # weights[l]: [E, out_l, in_l], biases[l]: [E, out_l]; the nn.Linear layout, stacked over experts
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(experts, d_out, d_in)) for d_in, d_out in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(experts, d_out)) for d_out in dims[1:])
        self.reset_parameters()
        # [routed pairs, dropped pairs] added up by capacity strategies on the device; read outside windows
        self.register_buffer("pair_counts", torch.zeros(2, dtype=torch.long), persistent=False)
        self.auto_candidates: tuple[str, ...] = AUTO_CANDIDATES
        self.auto_choice: AutoChoice | None = None  # what auto picked on the latest forward

    @classmethod
    def from_spec(cls, spec, strategy: str = "grouped", capacity_factor: float = 1.25) -> MoE:  # config.ModelSpec
        return cls(spec.experts, spec.hidden, spec.layers, spec.top_k, spec.input_dim, spec.classes, strategy,
                   capacity_factor)

    def reset_parameters(self) -> None:
        """Each expert initialised exactly as an nn.Linear stack would be: U(-1/sqrt(in), 1/sqrt(in))."""
        with torch.no_grad():
            for w, b in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(w.shape[2])
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    @property
    def num_params(self) -> int:
        return moe_params(self)

    @property
    def num_active_params(self) -> int:
        return moe_active_params(self)

    def stack(self) -> ReluMLPExperts:
        return ReluMLPExperts(tuple(self.weights), tuple(self.biases), self.capacity_factor, self.pair_counts)

    @property
    def layout(self) -> str:
        """The first layer's storage (later layers follow it where grouped_mm's alignment allows)."""
        return "in_out" if self.weights[0].stride(1) == 1 else "out_in"

    def set_layout(self, layout: str) -> None:
        """Re-store every weight as ``layout`` in place, values unchanged (an inference-time choice).

        grouped_mm reads the [E, in, out] view and needs its row stride 16-byte aligned: a layer whose
        requested storage would break that keeps the other one (e.g. [E, 10, H]: 10 fp32 are 40 bytes).
        """
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        for w in self.weights:
            E, n_out, n_in = w.shape
            want_in_out = layout == "in_out"
            row = (n_out if want_in_out else n_in) * w.element_size()
            other = (n_in if want_in_out else n_out) * w.element_size()
            if row % 16 and not other % 16:
                want_in_out = not want_in_out
            with torch.no_grad():
                if want_in_out:
                    w.data = w.detach().transpose(1, 2).contiguous().transpose(1, 2)  # [E, out, in] view
                else:
                    w.data = w.detach().contiguous()

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, in] -> expert_idx [T, k], gate_w [T, k] (softmax over the k chosen logits)."""
        logits = self.gate(x)  # [T, E]
        top, idx = logits.topk(self.top_k, dim=-1)  # [T, k], [T, k]
        return idx, top.float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.input_dim:  # shapes only: no sync
            self._bad_input(x)
        idx, gate_w = self.route(x)
        return self.run_experts(x, idx, gate_w, self.stack())

    def _bad_input(self, x: Any) -> None:
        """Say what the input should be, rather than let the gate's matmul report mismatched shapes."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE: input x is {kind_of(x)}; give a tensor [tokens, input_dim={self.input_dim}]")
        raise ConfigError(f"MoE: input x has shape {list(x.shape)}; give [tokens, input_dim={self.input_dim}] "
                          "(flatten any other leading dimensions into tokens)")

    def expert(self, e: int) -> nn.Sequential:
        """A copy of expert e as the seed's plain nn.Linear/ReLU stack (for checks and export)."""
        mods: list[nn.Module] = []
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            lin = nn.Linear(w.shape[2], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(w[e])
                lin.bias.copy_(b[e])
            mods.append(lin)
            if layer < self.layers:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)

    def extra_repr(self) -> str:
        return (
            f"experts={self.experts}, hidden={self.hidden}, layers={self.layers}, top_k={self.top_k}, "
            f"strategy={self._strategy!r}"
        )
