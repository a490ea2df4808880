"""Dense baselines matched to an MoE by total or by active parameters."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from torch import nn

from ..errors import ConfigError
from .counting import Shape, matched_width, mlp_params, moe_active_params, moe_params
from .moe import SHAPE_FIELDS, check_shape, kind_of

Match = Literal["total", "active"]
MATCHES = ("total", "active")


class DenseMLP(nn.Sequential):
    """Linear(in,W)+ReLU, (L-1) x [Linear(W,W)+ReLU], Linear(W,out): x [T, in] -> logits [T, out]."""

    def __init__(self, input_dim: int, width: int, layers: int, classes: int) -> None:
        dims = check_shape("DenseMLP", input_dim=input_dim, width=width, layers=layers, classes=classes)
        input_dim, width, layers, classes = dims["input_dim"], dims["width"], dims["layers"], dims["classes"]
        sizes = [input_dim] + [width] * layers
        mods: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            mods += [nn.Linear(d_in, d_out), nn.ReLU()]
        mods.append(nn.Linear(width, classes))
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


def matched_dense(spec: Shape, match: Match = "total") -> DenseMLP:
    """The dense model to compare with an MoE of this shape (an ``MoE`` module is a valid ``spec``)."""
    _check_match(match, "matched_dense")
    s = shape_of(spec, "matched_dense")
    return DenseMLP(s.input_dim, dense_width(s, match), s.layers, s.classes)
