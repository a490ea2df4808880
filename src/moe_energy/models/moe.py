"""Mixture of Experts: a linear gate, top-k routing and experts whose weights are stacked per layer.

One set of weights serves every execution strategy: switching ``moe.strategy`` changes how the experts
run, never what they compute.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .counting import moe_active_params, moe_params
from .strategies import AUTO_CANDIDATES, STRATEGIES, AutoChoice, ExpertStack, choose

# Physical storage of each [E, out, in] weight: "out_in" is the nn.Linear layout (contiguous), "in_out"
# stores the transpose ([E, in, out] contiguous, as torchtitan's grouped experts do). The values and the
# logical shape are the same; which one multiplies faster depends on the BLAS and the shape (optimize.py
# measures it).
LAYOUTS = ("out_in", "in_out")


class MoE(nn.Module):
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
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and experts={experts}")
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
        self.strategy = strategy
        self.capacity_factor = capacity_factor  # padded_capacity's C = ceil(factor * T*k / E)
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
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, name: str) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        self._strategy = name

    @property
    def num_params(self) -> int:
        return moe_params(self)

    @property
    def num_active_params(self) -> int:
        return moe_active_params(self)

    def stack(self) -> ExpertStack:
        return ExpertStack(tuple(self.weights), tuple(self.biases), self.capacity_factor, self.pair_counts)

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

    def reset_pair_counts(self) -> None:
        self.pair_counts.zero_()

    def strategy_info(self) -> dict:
        """Strategy facts for the results: what auto chose and measured, and pairs dropped by capacity.

        Reads the device counters (one sync): call it outside any timed window.
        """
        routed, dropped = self.pair_counts.tolist()
        c = self.auto_choice if self._strategy == "auto" else None
        return {
            "strategy": self._strategy,
            "resolved_strategy": c.name if c else self._strategy,
            "auto_probe_ms": dict(c.probe_ms) if c else None,
            "auto_probe_best_ms": dict(c.best_ms) if c else None,
            "auto_unavailable": dict(c.errors) if c else None,
            "weight_layout": self.layout,
            "capacity_factor": self.capacity_factor if self._strategy == "padded_capacity" else None,
            "routed_pairs": routed if self._strategy == "padded_capacity" else None,
            "dropped_pairs": dropped if self._strategy == "padded_capacity" else None,
        }

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, in] -> expert_idx [T, k], gate_w [T, k] (softmax over the k chosen logits)."""
        logits = self.gate(x)  # [T, E]
        top, idx = logits.topk(self.top_k, dim=-1)  # [T, k], [T, k]
        return idx, top.float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        idx, gate_w = self.route(x)
        ex = self.stack()
        name = self._strategy
        if name == "auto":
            self.auto_choice = choose(x, idx, gate_w, ex, self.auto_candidates)
            name = self.auto_choice.name
        return STRATEGIES[name](x, idx, gate_w, ex)

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
