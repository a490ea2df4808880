"""Mixture of Experts: a linear gate, top-k routing and experts whose weights are stacked per layer.

One set of weights serves every execution strategy: switching ``moe.strategy`` changes how the experts
run, never what they compute.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .counting import moe_active_params, moe_params
from .strategies import STRATEGIES, ExpertStack


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

    @classmethod
    def from_spec(cls, spec, strategy: str = "grouped") -> MoE:  # spec: config.ModelSpec
        return cls(spec.experts, spec.hidden, spec.layers, spec.top_k, spec.input_dim, spec.classes, strategy)

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
        return ExpertStack(tuple(self.weights), tuple(self.biases))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, in] -> expert_idx [T, k], gate_w [T, k] (softmax over the k chosen logits)."""
        logits = self.gate(x)  # [T, E]
        top, idx = logits.topk(self.top_k, dim=-1)  # [T, k], [T, k]
        return idx, top.float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        idx, gate_w = self.route(x)
        return STRATEGIES[self._strategy](x, idx, gate_w, self.stack())

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
