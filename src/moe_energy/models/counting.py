"""Parameter, FLOP and byte counts: arithmetic only, so xl/xxl can be sized without allocating them.

Conventions: FLOPs = 2 x multiply-accumulates of the matrix products (biases, ReLU, softmax and
routing are not counted: they are O(width), the products are O(width^2)).
"""

from __future__ import annotations

import math
from typing import Protocol


class Shape(Protocol):
    experts: int
    hidden: int
    layers: int
    top_k: int
    input_dim: int
    classes: int


def mlp_params(input_dim: int, width: int, layers: int, classes: int) -> int:
    """Linear(in,W) + (L-1) x Linear(W,W) + Linear(W,out), biases included: the seed's expert/dense shape."""
    return (input_dim * width + width) + (layers - 1) * (width * width + width) + (width * classes + classes)


def mlp_macs(input_dim: int, width: int, layers: int, classes: int) -> int:
    return input_dim * width + (layers - 1) * width * width + width * classes


def gate_params(s: Shape) -> int:
    return s.input_dim * s.experts + s.experts


def expert_params(s: Shape) -> int:
    return mlp_params(s.input_dim, s.hidden, s.layers, s.classes)


def moe_params(s: Shape) -> int:
    """Total trainable parameters of the MoE (gate + all experts)."""
    return gate_params(s) + s.experts * expert_params(s)


def moe_active_params(s: Shape) -> int:
    """Parameters one inference touches: the gate and k experts."""
    return gate_params(s) + s.top_k * expert_params(s)


def moe_flops(s: Shape) -> int:
    """FLOPs per inference (one sample): the gate plus k experts."""
    return 2 * (s.input_dim * s.experts + s.top_k * mlp_macs(s.input_dim, s.hidden, s.layers, s.classes))


def dense_flops(input_dim: int, width: int, layers: int, classes: int) -> int:
    return 2 * mlp_macs(input_dim, width, layers, classes)


def matched_width(target: int, input_dim: int, layers: int, classes: int) -> int:
    """Smallest whole width W whose dense MLP has >= target parameters (the seed's rule).

    Parameters are (L-1) W^2 + (in + 1 + (L-1) + out) W + out, so W is the ceiling of the quadratic's
    root; the integer nudge afterwards makes float rounding irrelevant.
    """
    a = layers - 1
    b = input_dim + 1 + (layers - 1) + classes
    c = classes - target
    if a == 0:
        w = math.ceil(-c / b)
    else:
        w = math.ceil((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    w = max(w, 1)
    while w > 1 and mlp_params(input_dim, w - 1, layers, classes) >= target:
        w -= 1
    while mlp_params(input_dim, w, layers, classes) < target:
        w += 1
    return w


def weight_bytes(params: int, bytes_per_param: int) -> int:
    return params * bytes_per_param


def moe_weight_params_read(s: Shape, experts_touched: int | None = None) -> int:
    """Parameters a batch must read at least: the gate and every expert that got a token.

    ``experts_touched`` defaults to all E (what a batch of >= E/k well-spread tokens reaches); pass the
    count seen in a real routing for small batches.
    """
    n = s.experts if experts_touched is None else experts_touched
    if not 0 <= n <= s.experts:
        raise ValueError(f"experts_touched={n} must be between 0 and experts={s.experts}")
    return gate_params(s) + n * expert_params(s)
