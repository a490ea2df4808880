"""Dense baselines matched to an MoE by total or by active parameters."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, overload

import torch
from torch import nn

from ..errors import ConfigError, kind_of
from .counting import (
    LayerShape,
    Shape,
    layer_active_params,
    layer_params,
    matched_width,
    mlp_params,
    moe_active_params,
    moe_params,
    swiglu_params,
)
from .kernels import FastLinear
from .llm import MoELayer
from .moe import SHAPE_FIELDS, check_shape

Match = Literal["total", "active"]
MATCHES = ("total", "active")


class DenseMLP(nn.Sequential):
    """Linear(in,W)+ReLU, (L-1) x [Linear(W,W)+ReLU], Linear(W,out): x [T, in] -> logits [T, out]. The Linears are
    ``kernels.FastLinear``: the same GEMM library as the MoE's experts."""

    def __init__(self, input_dim: int, width: int, layers: int, classes: int) -> None:
        dims = check_shape("DenseMLP", input_dim=input_dim, width=width, layers=layers, classes=classes)
        input_dim, width, layers, classes = dims["input_dim"], dims["width"], dims["layers"], dims["classes"]
        sizes = [input_dim] + [width] * layers
        mods: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            mods += [FastLinear(d_in, d_out), nn.ReLU()]
        mods.append(FastLinear(width, classes))
        super().__init__(*mods)
        self.input_dim, self.width, self.layers, self.classes = input_dim, width, layers, classes

    @property
    def num_params(self) -> int:
        return mlp_params(self.input_dim, self.width, self.layers, self.classes)


class Dims(NamedTuple):
    """A checked shape (plain ints), whatever object it was read from."""

    experts: int
    hidden: int
    layers: int
    top_k: int
    input_dim: int
    classes: int


def shape_of(spec: Any, where: str) -> Dims:
    """``spec``'s six shape fields, checked: an MoE, a ModelSpec or any object carrying them will do.

    Checked here because matched_width's arithmetic would divide by zero or never end on a bad one.
    """
    missing = [f for f in SHAPE_FIELDS if not hasattr(spec, f)]
    if missing:
        raise TypeError(f"{where}: spec is {kind_of(spec)}, without {', '.join(missing)}; give an MoE, a "
                        f"ModelSpec or an object with the attributes {', '.join(SHAPE_FIELDS)}")
    return Dims(**check_shape(where, **{f: getattr(spec, f) for f in SHAPE_FIELDS}))


def _check_match(match: Any, where: str) -> None:
    if not isinstance(match, str) or match not in MATCHES:
        raise ConfigError(f"{where}: match={match!r} is unknown; choose 'total' or 'active'")


def dense_width(spec: Shape, match: Match = "total") -> int:
    """Width of the dense baseline: smallest W with params >= the MoE's total (or active) count."""
    _check_match(match, "dense_width")
    s = shape_of(spec, "dense_width")
    target = moe_params(s) if match == "total" else moe_active_params(s)
    return matched_width(target, s.input_dim, s.layers, s.classes)


@overload
def matched_dense(spec: MoELayer, match: Match = "total") -> DenseSwiGLU: ...
@overload
def matched_dense(spec: Shape, match: Match = "total") -> DenseMLP: ...


def matched_dense(spec: Any, match: Match = "total") -> DenseMLP | DenseSwiGLU:
    """The dense model to compare with an MoE of this shape (an ``MoE`` module is a valid ``spec``).

    An LLM ``MoELayer`` gets the dense SwiGLU FFN of the smallest width reaching its total (or active) params:
    the layer-for-layer comparison (``swiglu_width``).
    """
    _check_match(match, "matched_dense")
    if isinstance(spec, MoELayer):
        return _matched_swiglu_of(spec, match)
    s = shape_of(spec, "matched_dense")
    return DenseMLP(s.input_dim, dense_width(s, match), s.layers, s.classes)


def _matched_swiglu_of(layer: MoELayer, match: Match) -> DenseSwiGLU:
    dims = layer.dims()
    if match == "active" and dims.top_k < 1:
        raise ConfigError("matched_dense: the layer's router has no top_k, so its active params are unknown; give "
                          "the router a top_k attribute, build the layer with MoELayer.from_arch, or use match='total'")
    return DenseSwiGLU(dims.d_model, swiglu_width(dims, match))


class DenseSwiGLU(nn.Module):
    """The dense FFN of an LLM layer: down(silu(gate(x)) * up(x)), no biases; x [T, d] -> [T, d]."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        dims = check_shape("DenseSwiGLU", d_model=d_model, width=width)
        self.d_model, self.width = dims["d_model"], dims["width"]
        self.gate_proj = FastLinear(self.d_model, self.width, bias=False)  # [W, d]
        self.up_proj = FastLinear(self.d_model, self.width, bias=False)  # [W, d]
        self.down_proj = FastLinear(self.width, self.d_model, bias=False)  # [d, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    @property
    def num_params(self) -> int:
        return swiglu_params(self.d_model, self.width)


def swiglu_width(arch: LayerShape, match: Match = "total") -> int:
    """Smallest width W whose dense SwiGLU (3 d W params) reaches the MoE layer's total (or active) params.

    The LLM counterpart of ``dense_width``: the comparison is layer for layer, a dense FFN in place of the MoE.
    """
    _check_match(match, "swiglu_width")
    target = layer_params(arch) if match == "total" else layer_active_params(arch)
    return max(1, -(-target // (3 * arch.d_model)))  # ceil without floats: exact for any size


def matched_swiglu(arch: LayerShape, match: Match = "total") -> DenseSwiGLU:
    """The dense SwiGLU FFN to compare with one MoE layer of ``arch``."""
    return DenseSwiGLU(arch.d_model, swiglu_width(arch, match))
