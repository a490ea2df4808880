"""Dense baselines matched to an MoE by total or by active parameters."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .counting import Shape, matched_width, mlp_params, moe_active_params, moe_params

Match = Literal["total", "active"]


class DenseMLP(nn.Sequential):
    """Linear(in,W)+ReLU, (L-1) x [Linear(W,W)+ReLU], Linear(W,out): x [T, in] -> logits [T, out]."""

    def __init__(self, input_dim: int, width: int, layers: int, classes: int) -> None:
        dims = [input_dim] + [width] * layers
        mods: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(d_in, d_out), nn.ReLU()]
        mods.append(nn.Linear(width, classes))
        super().__init__(*mods)
        self.input_dim, self.width, self.layers, self.classes = input_dim, width, layers, classes

    @property
    def num_params(self) -> int:
        return mlp_params(self.input_dim, self.width, self.layers, self.classes)


def dense_width(spec: Shape, match: Match = "total") -> int:
    """Width of the dense baseline: smallest W with params >= the MoE's total (or active) count."""
    if match not in ("total", "active"):
        raise ValueError(f"match must be 'total' or 'active', not {match!r}")
    target = moe_params(spec) if match == "total" else moe_active_params(spec)
    return matched_width(target, spec.input_dim, spec.layers, spec.classes)


def matched_dense(spec: Shape, match: Match = "total") -> DenseMLP:
    """The dense model to compare with an MoE of this shape (an ``MoE`` module is a valid ``spec``)."""
    return DenseMLP(spec.input_dim, dense_width(spec, match), spec.layers, spec.classes)
